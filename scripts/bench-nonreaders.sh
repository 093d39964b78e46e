#!/usr/bin/env bash
# Issue 12's benchmark: N clients (default 16,000) that each write up to
# 10 MB in 64 KiB writes and never read (scripts/nonreaders.py), then one
# `upcase send --bytes 1G` verified stream beside them. Prints the server's
# RSS and the kernel's TCP memory (pages, /proc/net/sockstat; compare with
# /proc/sys/net/ipv4/tcp_mem). Loopback only; every loop is bounded.
# On one loopback host both halves of every attacker connection are in this
# kernel, against one net.ipv4.tcp_mem: with TCP_MEM="MIN PRESSURE MAX"
# (pages) the script sets it for the run and puts the old value back, so
# that the kernel holds the attackers' half as another host would.
# Usage: [TCP_MEM="..."] scripts/bench-nonreaders.sh MODEL PORT [N]
#        (build --release first)
set -u
if [ -n "${TCP_MEM:-}" ]; then
  old_tcp_mem=$(sysctl -n net.ipv4.tcp_mem | tr '\t' ' ')
  trap 'sysctl -q -w net.ipv4.tcp_mem="$old_tcp_mem"' EXIT
  sysctl -q -w net.ipv4.tcp_mem="$TCP_MEM" || exit 1
fi
echo "net.ipv4.tcp_mem = $(sysctl -n net.ipv4.tcp_mem | tr '\t' ' ')"
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
# PSS of the server and its children (fork's): their shared pages counted once.
pss() { for p in $1 $(pgrep -P $1); do awk '/^Pss:/ {print $2}' /proc/$p/smaps_rollup 2>/dev/null; done | awk '{s+=$1} END {print s}'; }
echo "server: $(ls /proc/$SP/fd | wc -l) fds, RSS $(awk '/VmRSS/ {print $2}' /proc/$SP/status) KiB (at start $base KiB), PSS with children $(pss $SP) KiB, $(pgrep -P $SP | wc -l) children"
grep TCP: /proc/net/sockstat
# Whose half the kernel memory is: the server's sockets (local port PORT)
# against the clients', from ss -m (receive, send queued, bytes).
ss -tmnH state established | python3 -c '
import re, sys
port, side = ":'"$port"'", {"server": [0, 0, 0], "clients": [0, 0, 0]}
lines = sys.stdin.read().split("\n")
for head, mem in zip(lines[::2], lines[1::2]):
    cols = head.split()
    if len(cols) < 4 or "skmem" not in mem: continue
    who = "server" if cols[2].endswith(port) else "clients" if cols[3].endswith(port) else None
    if who is None: continue
    m = dict(re.findall(r"([a-z]+)(\d+)", mem.split("skmem:(")[1]))
    side[who][0] += 1; side[who][1] += int(m["r"]); side[who][2] += int(m["w"])
for who, (n, r, w) in side.items():
    print("kernel, %s sockets: %d, receive queues %.0f MB, send queues %.0f MB" % (who, n, r / 1e6, w / 1e6))
'
timeout 120 $U send "127.0.0.1:$port" --bytes "${STREAM:-1G}" 2>&1 | grep -E "received|wrong|MB/s"
echo "send exit ${PIPESTATUS[0]} (124: the stream did not finish in 120 s)"
echo "server after: RSS $(awk '/VmRSS/ {print $2}' /proc/$SP/status) KiB, peak $(awk '/VmHWM/ {print $2}' /proc/$SP/status) KiB"
grep TCP: /proc/net/sockstat
kill $NR $SP 2>/dev/null; wait 2>/dev/null
