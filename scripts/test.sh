#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs them.
# Used by newcomers (README) and by CI (.ci/run), so the two cannot drift.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests talk to: Python 3 (ports of the seeds), OpenBSD
# netcat (nc -N), socat; and for the UDP loss test, ip (network
# namespaces), tc and nft (loss inside the test's own namespace); openssl (TLS peer,
# certificates), curl and promtool
# (Debian's prometheus package) check the --metrics output.
# Installed only when missing.
need=()
command -v python3 >/dev/null || need+=(python3)
nc -h 2>&1 | grep -q -- '-N' || need+=(netcat-openbsd)
command -v socat >/dev/null || need+=(socat)
command -v ip >/dev/null && command -v tc >/dev/null && command -v ss >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v promtool >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null || need+=(systemd)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # --no-install-recommends: promtool is all we want of prometheus.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The tests stream gigabytes through the real binary; Cargo.toml builds the
# dev/test profile optimised, so plain `cargo test` is fast enough.
log=$(mktemp)
# Tests that cannot do part of their work here (no io_uring, no network
# namespaces) say so in this file (tests/common: skip()); it is counted
# below, never passed over in silence.
export UPCASE_SKIP_LOG
UPCASE_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$UPCASE_SKIP_LOG"' EXIT
set +e
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for all the test binaries together, with the skips.
skipped=$(sort -u "$UPCASE_SKIP_LOG" | grep -c . || true)
if [ "$skipped" -gt 0 ]; then
  echo "skipped, and why:"
  sort -u "$UPCASE_SKIP_LOG" | sed 's/^/  /'
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
