#!/usr/bin/env bash
# Memory and time of one large bundle through the whole pipeline (release build):
# builds a sample bundle with a layer of MB MiB of random bytes (default 400), starts the
# loopback stack, uploads it, and prints the time to Published and shipperd's resident
# memory before and at its peak (VmHWM), sampled from /proc.
#   scripts/bench-rss.sh [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-400}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
RUST_LOG=warn start_stack

echo "== building a bundle with a ${MB} MiB layer"
$BIN/shipperd-dev sample-bundle --out "$DEMO/big.squashfs" --big-layer-mb "$MB" --salt "bench-$(date +%s%N)" >/dev/null
SIZE=$(stat -c %s "$DEMO/big.squashfs")
rss() { awk '/^VmRSS/ {print $2}' "/proc/$SHIPPERD_PID/status"; }
BASE=$(rss)

T0=$(date +%s.%N)
upload "$DEMO/big.squashfs" big.squashfs
T1=$(date +%s.%N)
PEAK=0
for _ in $(seq 1 6000); do
  R=$(rss); [ "$R" -gt "$PEAK" ] && PEAK=$R
  PHASE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq -r .phase)
  case "$PHASE" in Published|Failed) break;; esac
  sleep 0.1
done
T2=$(date +%s.%N)
HWM=$(awk '/^VmHWM/ {print $2}' "/proc/$SHIPPERD_PID/status")

echo "== result"
printf 'bundle            %d MiB (%d bytes), phase %s\n' $((SIZE >> 20)) "$SIZE" "$PHASE"
printf 'upload (PUT)      %.2f s  (%.0f MB/s)\n' "$(echo "$T1 - $T0" | bc -l)" "$(echo "$SIZE / ($T1 - $T0) / 1000000" | bc -l)"
printf 'upload→Published  %.2f s  (%.0f MB/s)\n' "$(echo "$T2 - $T1" | bc -l)" "$(echo "$SIZE / ($T2 - $T1) / 1000000" | bc -l)"
printf 'shipperd RSS      %d MiB before, %d MiB peak sampled, %d MiB VmHWM\n' $((BASE / 1024)) $((PEAK / 1024)) $((HWM / 1024))
[ "$PHASE" = Published ]
