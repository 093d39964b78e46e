#!/usr/bin/env bash
# How evenly the kernel spreads connections over worker processes:
# `serve --processes N` (one listener, inherited by every worker) against
# N separate `serve --reuseport` processes (a listener each, the kernel
# hashing each connection to one). crr (a new connection per request) for
# a few seconds, then each process's count of connections, from its log.
# Usage: scripts/accept-shares.sh [N] [PORT] [MODEL]   (build --release first)
set -u
U=${U:-$(dirname "$0")/../target/release/upcase}
n=${1:-4}; port=${2:-1071}; model=${3:-epoll}
crr() { $U bench 127.0.0.1:$port --mode crr --conns 50 --duration 5s --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("crr: %.0f conn/s, errors %d" % (r["msgs_per_s"], r["errors"]))'; }
shares() { sort | uniq -c | awk '{print $1}' | sort -rn | tr '\n' ' '; echo; }

echo "== --processes $n (one shared listener), $model"
$U serve --model "$model" --processes "$n" "tcp://127.0.0.1:$port" > /dev/null 2> /tmp/shares-shared.log & sp=$!
sleep 1; crr; kill $sp; wait $sp 2>/dev/null
echo -n "connections per worker: "
grep "connection from" /tmp/shares-shared.log | grep -o '^worker [0-9]*' | shares

echo "== $n x serve --reuseport (a listener each), $model"
pids=()
for i in $(seq "$n"); do
  $U serve --model "$model" --reuseport "tcp://127.0.0.1:$port" > /dev/null 2> "/tmp/shares-reuseport-$i.log" & pids+=($!)
done
sleep 1; crr; kill "${pids[@]}"; wait 2>/dev/null
echo -n "connections per process: "
for i in $(seq "$n"); do grep -c "connection from" "/tmp/shares-reuseport-$i.log"; done | sort -rn | tr '\n' ' '; echo
