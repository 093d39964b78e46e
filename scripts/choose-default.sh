#!/usr/bin/env bash
# Which model should `serve` use by default? Service demand (server CPU per
# message) at rr 50x512 and 1000x64, and p99 at 80 % of capacity, under two
# load engines of different design (one io_uring loop; a blocking thread
# per connection), server and client pinned to separate cores. Each
# closed-loop cell is run RUNS times; the table shows the median and the
# spread. Usage: scripts/choose-default.sh [RUNS] [DURATION] [OUT]
# (build --release first). Takes about 12 minutes with the defaults.
set -eu
U=${U:-$(dirname "$0")/../target/release/upcase}
runs=${1:-3}; dur=${2:-3s}; out=${3:-/tmp/choose-default}
models=${MODELS:-select,epoll,async,uring,threads}
mkdir -p "$out"
for engine in uring threads; do
  for shape in 50x512 1000x64; do
    conns=${shape%x*}; size=${shape#*x}
    for run in $(seq "$runs"); do
      echo "== engine $engine, rr $shape, run $run" >&2
      $U bench --compare --models "$models" --workloads rr --conns "$conns" --size "$size" \
        --duration "$dur" --engine "$engine" --pin 0:1 --no-intervals --json \
        > "$out/rr-$engine-$shape-$run.json"
    done
  done
  echo "== engine $engine, sweep 50x512" >&2
  $U bench --compare --sweep --models "$models" --duration 1s --engine "$engine" --pin 0:1 \
    --no-intervals --out "$out/sweep-$engine" > /dev/null
done
python3 - "$out" <<'EOF'
import glob, json, os, statistics, sys
out = sys.argv[1]
cells = {}
for f in sorted(glob.glob(os.path.join(out, "rr-*.json"))):
    _, engine, shape, _ = os.path.basename(f)[:-5].split("-")
    for server in json.load(open(f)):
        for r in server["reports"]:
            d = r["service_demand"] or {}
            cells.setdefault((engine, shape, server["server"]), []).append(
                (r["msgs_per_s"], d.get("user_us", 0) + d.get("sys_us", 0), r["latency_us"]["p99"]))
p80 = {}
for engine in ("uring", "threads"):
    for p in json.load(open(os.path.join(out, f"sweep-{engine}", "sweep.json"))):
        if abs(p["fraction"] - 0.8) < 1e-9:
            p80[(engine, p["server"])] = p["p99_us"]
def med(xs): return statistics.median(xs)
def spread(xs): return f"{min(xs):,.0f}–{max(xs):,.0f}" if len(xs) > 1 else ""
for engine in ("uring", "threads"):
    for shape in ("50x512", "1000x64"):
        rows = {s: v for (e, sh, s), v in cells.items() if e == engine and sh == shape}
        if not rows: continue
        tokio = med([d for _, d, _ in rows.get("async", [(0, 0, 0)])])
        best = max(med([m for m, _, _ in v]) for v in rows.values())
        print(f"\n### engine {engine}, rr {shape}, pinned 0:1, median of {len(next(iter(rows.values())))} runs\n")
        print("| model | msg/s (median, range) | of best | server µs/msg (user+sys) | of tokio's | p99 µs (median) | p99 at 80 % load |")
        print("|---|---|---|---|---|---|---|")
        for s, v in sorted(rows.items(), key=lambda kv: med([d for _, d, _ in kv[1]])):
            m, d, p = med([x[0] for x in v]), med([x[1] for x in v]), med([x[2] for x in v])
            p8 = p80.get((engine, s)) if shape == "50x512" else None
            print(f"| {s} | {m:,.0f} ({spread([x[0] for x in v])}) | {m/best:.2f} | {d:.2f} | {d/tokio if tokio else 0:.2f} | {p:,.0f} | {f'{p8:,.0f}' if p8 else ''} |")
EOF
