#!/usr/bin/env bash
# Issue 12's benchmark: N clients (default 16,000) that each write up to
# 10 MB in 64 KiB writes and never read (scripts/nonreaders.py), then one
# `upcase send --bytes 1G` verified stream beside them. Prints the server's
# RSS and the kernel's TCP memory (pages, /proc/net/sockstat; compare with
# /proc/sys/net/ipv4/tcp_mem). Loopback only; every loop is bounded.
# Usage: scripts/bench-nonreaders.sh MODEL PORT [N]   (build --release first)
set -u
U=${U:-$(dirname "$0")/../target/release/upcase}
model=$1; port=$2; n=${3:-16000}
ulimit -n 20000
$U serve -q --model "$model" ${SERVE_ARGS:-} "tcp://127.0.0.1:$port" > /dev/null 2> "/tmp/nonreaders-$model.log" & SP=$!
sleep 0.5
base=$(awk '/VmRSS/ {print $2}' /proc/$SP/status)
python3 "$(dirname "$0")/nonreaders.py" "$port" "$n" 120 > "/tmp/nonreaders-$model.out" &
NR=$!
for _ in $(seq 240); do grep -q holding "/tmp/nonreaders-$model.out" 2>/dev/null && break; sleep 0.5; done
cat "/tmp/nonreaders-$model.out"
echo "server: $(ls /proc/$SP/fd | wc -l) fds, RSS $(awk '/VmRSS/ {print $2}' /proc/$SP/status) KiB (at start $base KiB)"
grep TCP: /proc/net/sockstat
timeout 120 $U send "127.0.0.1:$port" --bytes "${STREAM:-1G}" 2>&1 | grep -E "received|wrong|MB/s"
echo "send exit ${PIPESTATUS[0]} (124: the stream did not finish in 120 s)"
kill $NR $SP 2>/dev/null; wait 2>/dev/null
