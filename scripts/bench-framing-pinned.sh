#!/bin/bash
# The framing benchmark pinned: server on CPU 1, load generator on CPU 0,
# under both load engines; upcase's default model against the tokio-util
# baselines (docs/BENCHMARKS.md). Needs: cargo build --release --examples
cd "$(dirname "$0")/.."
B=target/release/upcase
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
start() { # name cmd...
  taskset -c 1 "$@" > "$OUT" 2>/dev/null & PID=$!
  for i in $(seq 50); do grep -q listening "$OUT" && break; sleep 0.1; done
  ADDR=$(head -1 "$OUT" | awk '{print $2}')
}
for f in line length; do
for server in uring tokio; do
  if [ $server = uring ]; then start $B serve -q --framing $f tcp://127.0.0.1:0;
  else start target/release/examples/baseline_tokio_$( [ $f = line ] && echo lines || echo length ) 0; fi
  for engine in uring epoll; do for k in 32 1; do
    r=$(taskset -c 0 $B bench $ADDR --framing $f --size 64 --pipeline $k --conns 50 --duration 3s --engine $engine --server-pid $PID --no-intervals 2>/dev/null)
    echo "$f $server engine=$engine pipeline=$k: $(echo "$r" | grep -E '^msgs/s' | awk '{print $2}') msg/s, p99 $(echo "$r" | grep -oE 'p99 [0-9.]+' | head -1), $(echo "$r" | grep -E '^cpu' | sed 's/cpu: *//')"
  done; done
  kill $PID; wait $PID 2>/dev/null
done
done
