#!/bin/bash
# TLS beside plain TCP (docs/BENCHMARKS.md): one server per model with a
# tls:// and a tcp:// listener, alternating runs, unpinned and pinned.
# Makes a self-signed certificate in /tmp. Build --release first.
U=${U:-$(dirname "$0")/../target/release/upcase}
C=/tmp/upcase-cert.pem; K=/tmp/upcase-key.pem
[ -f $C ] || openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE -keyout $K -out $C 2>/dev/null
for pin in no yes; do
 for model in uring epoll; do
  if [ $pin = yes ]; then SP="taskset -c 0"; CPN="taskset -c 1"; else SP=""; CPN=""; fi
  $SP $U serve -q --model $model --cert $C --key $K tls://127.0.0.1:0 tcp://127.0.0.1:0 > /tmp/tb.out 2>/dev/null &
  S=$!; sleep 0.4
  T=$(grep tls /tmp/tb.out | sed 's|listening ||'); P=$(grep tcp /tmp/tb.out | sed 's|listening ||')
  for i in 1 2; do
   for ep in $P $T; do
    ca=""; [ "${ep%%:*}" = tls ] && ca="--ca $C"
    st=$($CPN $U send $ep $ca --bytes 1G 2>/dev/null | grep MB/s | awk '{print $2}')
    rr=$($CPN $U bench $ep $ca --engine threads --conns 50 --size 512 --duration 4s --no-intervals --server-pid $S --json 2>/dev/null | python3 -c "import json,sys; v=json.load(sys.stdin); d=v['service_demand']; print('%d msg/s p99 %.0f us, server %.2f cores, user %.2f sys %.2f us/msg, errors %d' % (v['msgs_per_s'], v['latency_us']['p99'], v['server_cpu'], d['user_us'], d['sys_us'], v['errors']))")
    echo "pin=$pin $model ${ep%%:*} run$i: stream $st MB/s | rr $rr"
   done
  done
  kill $S; wait $S 2>/dev/null
 done
done
