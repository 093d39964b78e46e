#!/bin/bash
# A-B-A: the binary before a change (A) and after it (B), run in turn on the
# same machine, pinned (server on CPU 1, load generator on CPU 0), each
# measured with the load generator of the B binary:
#   rr 50 x 512 (msg/s, server CPU per message), a verified 1 GiB stream
#   (send, MB/s) and pipelined --framing line, 50 x 64 B at 32 in flight.
# Usage: scripts/bench-core-aba.sh OLD_BINARY NEW_BINARY [MODELS...]
set -u
A=$1 B=$2; shift 2
MODELS=${*:-uring epoll threads}
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
start() { # binary args...
  taskset -c 1 "$@" > "$OUT" 2>/dev/null & PID=$!
  for _ in $(seq 50); do grep -q listening "$OUT" && break; sleep 0.1; done
  ADDR=$(head -1 "$OUT" | awk '{print $2}')
}
bench() { # args...
  taskset -c 0 "$B" bench "$ADDR" --server-pid "$PID" --no-intervals --duration 3s "$@" 2>/dev/null
}
field() { grep -E "^$1" | head -1; }
for model in $MODELS; do
  for run in A1:$A B1:$B A2:$A B2:$B A3:$A B3:$B; do
    name=${run%%:*} bin=${run#*:}
    start "$bin" serve -q --model "$model" tcp://127.0.0.1:0
    rr=$(bench --mode rr --conns 50 --size 512)
    msgs=$(echo "$rr" | field msgs/s | awk '{print $2}')
    us=$(echo "$rr" | grep -oE '[0-9.]+ us per message' | awk '{print $1}')
    mb=$(taskset -c 0 "$B" send "$ADDR" --bytes 1G 2>&1 | grep -E '^MB/s' | awk '{print $2}')
    kill $PID; wait $PID 2>/dev/null
    start "$bin" serve -q --model "$model" --framing line tcp://127.0.0.1:0
    pl=$(bench --framing line --size 64 --pipeline 32 --conns 50)
    plmsgs=$(echo "$pl" | field msgs/s | awk '{print $2}')
    plus=$(echo "$pl" | grep -oE '[0-9.]+ us per message' | awk '{print $1}')
    kill $PID; wait $PID 2>/dev/null
    echo "$model $name: rr50x512 $msgs msg/s ($us us/msg)  stream1G $mb MB/s  line-pipe32 $plmsgs msg/s ($plus us/msg)"
  done
done
