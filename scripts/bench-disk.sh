#!/usr/bin/env bash
# Peak extra disk per bundle format: builds the sample bundle with a layer of MB MiB of
# random bytes (default 200) as squashfs, tar, tar.gz (a Koffer-style registry tree
# under platform/mirror/), tar.zst and tar.xz; pushes each through the loopback stack
# (release build) while sampling the data directory every 50 ms; prints the bundle's size,
# the peak of everything beside the stored bundle, and that peak relative to the bundle,
# and what is left once the bundle is Published.
#   scripts/bench-disk.sh [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-200}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench-disk
rm -rf "$DEMO"
source scripts/lib.sh
RUST_LOG=warn start_stack

extra() { # bytes under the data dir other than stored bundles (files named bundle or parts/*)
  du -sb --exclude=bundle "$DEMO/data" | cut -f1
}
printf '%-22s %10s %12s %8s %10s %8s\n' format "bundle" "peak extra" ratio "left" seconds
for spec in "squashfs::" "tar:tar:" "tar.gz:gzip:platform/mirror/" "tar.zst:zstd:" "tar.xz:xz:"; do
  IFS=: read -r ext archive tree <<<"$spec"
  out="$DEMO/b-$RANDOM.$ext"
  args=(--out "$out" --big-layer-mb "$MB" --salt "disk-$ext-$(date +%s%N)")
  [ -n "$archive" ] && args+=(--archive "$archive")
  [ -n "$tree" ] && args+=(--tree "$tree")
  $BIN/shipperd-dev sample-bundle "${args[@]}" >/dev/null
  size=$(stat -c %s "$out")
  base=$(extra)
  T0=$(date +%s.%N)
  upload "$out" "$(basename "$out")"
  peak=0
  for _ in $(seq 1 6000); do
    e=$(( $(extra) - base )); [ "$e" -gt "$peak" ] && peak=$e
    PHASE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0" | jq -r .phase)
    case "$PHASE" in Published|Failed) break;; esac
    sleep 0.05
  done
  T1=$(date +%s.%N)
  left=$(( $(extra) - base ))
  printf '%-22s %9dM %11dM %8.3f %9dK %8.2f  %s\n' "$ext${tree:+ (tree)}" $((size >> 20)) $((peak >> 20)) \
    "$(echo "$peak / $size" | bc -l)" $((left >> 10)) "$(echo "$T1 - $T0" | bc -l)" "$PHASE"
  rm -f "$out"
done
