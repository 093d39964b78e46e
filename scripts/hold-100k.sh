#!/usr/bin/env bash
# Issue 16's benchmark: 100,000 idle connections held on
# `serve --processes 6`, listening on 127.0.0.1 to 127.0.0.6 (one port),
# and rr on 50 other connections with and without them.
#
# One process holds at most ~20,000 descriptors, so the held connections
# come from six `bench --mode hold` processes, one per destination address
# (each ~16,667 connections, under the ~28,000 ephemeral ports one source
# may use toward one destination); they run rr at 1 request/s in all, so
# they add no load. Prints the rr figures (rate, p99) without and with the
# held connections, the workers' RSS growth per held connection, and each
# worker's share. Loopback only; every wait is bounded.
# Usage: scripts/hold-100k.sh [PORT] [HELD] [MODEL]   (build --release first)
set -u
U=${U:-$(dirname "$0")/../target/release/upcase}
port=${1:-1070}; held=${2:-100000}; model=${3:-epoll}
ulimit -n 20000
for k in fs.nr_open fs.file-max net.ipv4.ip_local_port_range net.core.somaxconn; do
  echo "$k = $(sysctl -n $k | tr '\t' ' ')"
done
pidfile=/tmp/hold-100k.pid
$U serve -q --model "$model" --processes 6 --idle-timeout 0 --pid-file $pidfile \
  $(for i in 1 2 3 4 5 6; do echo tcp://127.0.0.$i:$port; done) > /dev/null 2> /tmp/hold-100k.log &
for _ in $(seq 50); do [ -s $pidfile ] && break; sleep 0.1; done
sup=$(cat $pidfile)
workers() { cat /proc/$sup/task/$sup/children; }
rss() { local t=0; for w in $(workers); do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$w/status))); done; echo $t; }
conns() { local t=0; for w in $(workers); do t=$((t + $(ls /proc/$w/fd | wc -l))); done; echo $t; }
rr() { $U bench 127.0.0.1:$port --mode rr --conns 50 --size 512 --duration 5s --json \
       | python3 -c 'import json,sys; r=json.load(sys.stdin); l=r["latency_us"]; print("rr: %.0f msg/s, p50 %s us, p99 %s us, errors %d" % (r["msgs_per_s"], l["p50"], l["p99"], r["errors"]))'; }
echo "without held connections:"; rr
base_rss=$(rss); base_fds=$(conns)
per=$(( (held + 5) / 6 ))
for i in 1 2 3 4 5 6; do
  $U bench 127.0.0.$i:$port --mode hold --conns $per --active 1 --rate 1 --duration 600s \
    > /dev/null 2> /tmp/hold-100k-client-$i.log &
done
for _ in $(seq 600); do
  n=$(( $(conns) - base_fds ))
  [ $n -ge $held ] && break
  sleep 1
done
echo "held: $(( $(conns) - base_fds )) connections on the workers"
sleep 2
now_rss=$(rss)
echo "workers' RSS: $base_rss KiB -> $now_rss KiB: $(( (now_rss - base_rss) * 1024 / held )) bytes per held connection"
grep -E "^TCP:" /proc/net/sockstat
echo "with them:"; rr
for w in $(workers); do echo "worker pid $w: $(( $(ls /proc/$w/fd | wc -l) )) descriptors"; done
kill $(jobs -p | tail -6) 2>/dev/null
kill "$sup"; wait 2>/dev/null
grep "accepted" /tmp/hold-100k.log
