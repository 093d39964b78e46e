#!/bin/bash
# What connections cost the server's memory (RSS growth over a warmed-up
# baseline), under the default --max-buffered (64M), per model:
#  - N clients each holding 8 MiB - 1 bytes of a length-prefixed message,
#    with honest framed rr traffic beside them (bench verifies every reply);
#  - N TLS connections that sent one byte; N idle after a handshake and
#    one message.
# Usage: scripts/bench-core-memory.sh BINARY [MODELS...]
# (SKIP_LENGTH=1: only the TLS part, for a binary without the budget for
# held messages, which would take 16 GB here.)
# Needs python3 and openssl. Raises the open-file limit for the clients.
set -u
B=$1; shift
MODELS=${*:-uring epoll threads}
HERE=$(cd "$(dirname "$0")" && pwd)
ulimit -n 20000
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TMP/key.pem" -out "$TMP/cert.pem" \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -days 1 2>/dev/null
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
start() { # args...
  "$B" serve -q "$@" > "$TMP/out" 2>/dev/null & PID=$!
  for _ in $(seq 50); do grep -q listening "$TMP/out" && break; sleep 0.1; done
  ADDR=$(head -1 "$TMP/out" | awk '{print $2}'); HP=${ADDR#*://}
}
hold() { # kind n: starts the clients, waits until they are in place
  exec 3> >(python3 "$HERE/held_clients.py" "$1" "${HP%:*}" "${HP##*:}" "$2" > "$TMP/held")
  for _ in $(seq 600); do grep -q ready "$TMP/held" 2>/dev/null && break; sleep 0.1; done
}
release() { exec 3>&-; sleep 0.5; }
for model in $MODELS; do
  N=2000
  if [ -z "${SKIP_LENGTH:-}" ]; then
  start --model "$model" --framing length tcp://127.0.0.1:0
  "$B" bench "$ADDR" --framing length --size 4096 --conns 8 --duration 1s --no-intervals >/dev/null 2>&1
  base=$(rss $PID)
  hold length $N
  sleep 1
  held=$(rss $PID)
  beside=$("$B" bench "$ADDR" --framing length --size 60000 --conns 4 --duration 3s --no-intervals 2>/dev/null | grep -E '^(msgs/s|errors)' | tr -s ' \n' ' ')
  grew=$((held - base))
  echo "$model: $N x (8 MiB - 1) held: RSS +$((grew / 1024)) MiB ($((grew * 1024 / N)) B per connection; goal <= 64 MiB + 4 KiB each = $(((65536 + 4 * N) / 1024)) MiB); beside: $beside"
  release; kill $PID; wait $PID 2>/dev/null
  fi
  for kind in tls1 tlsidle; do
    N=$([ $kind = tls1 ] && echo 4000 || echo 2000)
    start --model "$model" --cert "$TMP/cert.pem" --key "$TMP/key.pem" tls://127.0.0.1:0
    hold tlsidle 20; release
    base=$(rss $PID)
    hold $kind $N
    sleep 1
    held=$(rss $PID)
    grew=$((held - base))
    echo "$model: $N TLS connections ($kind): RSS +$((grew / 1024)) MiB, $((grew * 1024 / N)) B each (goal <= 8192)"
    release; kill $PID; wait $PID 2>/dev/null
  done
done
