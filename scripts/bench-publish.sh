#!/usr/bin/env bash
# Publish speed against the alternatives, on loopback (release build):
#   1. the raw ceiling: every distinct blob uploaded once by parallel `curl` (POST, PUT);
#   2. `skopeo copy --all` of each image from the extracted OCI layout, one after the
#      other, as sites do today;
#   3. ShipperD end to end (upload → Published) and publish alone (Publishing →
#      Published), with the peak resident memory of `shipperd all`;
#   4. Day-2: the same images in another bundle, all already in the registry.
# Each run gets a fresh docker-registry. The bundle: six images and a two-platform
# index sharing a 150 MiB base layer, each with its own 110 MiB layer (55 MiB per
# platform), about 0.9 GiB of distinct blobs.
#   scripts/bench-publish.sh [BASE_MB OWN_MB] [PARALLEL] [OWN_LAYERS]
# OWN_LAYERS (default 1) splits each image's own bytes into that many layers, each half
# the one before, as real images have (one large layer, several small ones).
# PERF=FILE profiles shipperd with `perf record` during the first bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_MB=${1:-150}
OWN_MB=${2:-110}
PAR=${3:-4}
OWN_LAYERS=${4:-1}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
rm -rf "$DEMO"; mkdir -p "$DEMO"
W=.bench-publish
rm -rf "$W"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W"' EXIT

echo "== building the bundle"
$BIN/shipperd-dev bench-bundle --dir "$W" --base-mb "$BASE_MB" --own-mb "$OWN_MB" \
  --own-layers "$OWN_LAYERS"
BYTES=$(awk '{s += $2} END {print s}' "$W/blobs.txt")
mbps() { echo "$BYTES / $1 / 1000000" | bc -l; }

echo "== 1. raw ceiling: $PAR parallel curl uploads of each distinct blob"
start_registry ceiling
export RP W
upload_blob() {
  local d=$1 f loc
  f="$W/layout/blobs/sha256/${d#sha256:}"
  loc=$(curl -sS -X POST -D - -o /dev/null "http://127.0.0.1:$RP/v2/ceiling/blobs/uploads/" \
    | awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
  curl -sS --fail -X PUT -T "$f" -H 'content-type: application/octet-stream' "$loc&digest=$d" -o /dev/null
}
export -f upload_blob
T0=$(now)
cut -d' ' -f1 "$W/blobs.txt" | xargs -P "$PAR" -n 1 bash -c 'upload_blob "$0"'
T_CEIL=$(secs "$T0" "$(now)")
CPU_CEIL=$(cpu "$RPID")

echo "== 2. skopeo copy --all, image after image"
start_registry skopeo
T0=$(now)
while read -r ref; do
  skopeo copy -q --all --dest-tls-verify=false "oci:$W/layout:$ref" \
    "docker://127.0.0.1:$RP/${ref#*/}" >/dev/null
done <"$W/images.txt"
T_SKOPEO=$(secs "$T0" "$(now)")
CPU_SKOPEO=$(cpu "$RPID")

echo "== 3. ShipperD"
RUST_LOG=warn start_stack
rss() { awk "/^$1/ {print \$2}" "/proc/$SHIPPERD_PID/status"; }
RSS0=$(rss VmRSS)
# run FILE NAME: upload, then poll; sets T_E2E (upload → Published) and T_PUB
# (unpacked → last image done, from the bundle's record).
run() {
  local t0 t1 phase
  t0=$(now)
  upload "$1" "$2" >/dev/null
  PUB_CPU0=""
  for _ in $(seq 1 12000); do
    phase=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0" | jq -r .phase)
    case "$phase" in Published|Failed) break ;; esac
    # CPU used so far, taken when publishing starts: the publish phase's share.
    if [ "$phase" = Publishing ] && [ -z "$PUB_CPU0" ]; then
      PUB_CPU0=$(cpu "$SHIPPERD_PID") PUB_REG0=$(cpu "$REG_PID")
    fi
    sleep 0.02
  done
  t1=$(now)
  [ "$phase" = Published ] || { echo "bundle $2 ended $phase" >&2; exit 1; }
  T_E2E=$(secs "$t0" "$t1")
  # Publish alone, as the bundle's record says: unpacked_at → finished_at.
  local rec
  rec=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA")
  T_PUB=$(secs "$(date -d "$(jq -r .unpacked_at <<<"$rec")" +%s.%N)" \
    "$(date -d "$(jq -r .finished_at <<<"$rec")" +%s.%N)")
}
REG_PID=$(pgrep -f "docker-registry serve $DEMO/registry.yml" | head -1)
C0=$(cpu "$SHIPPERD_PID") R0=$(cpu "$REG_PID")
# PERF=FILE: profile shipperd (perf record) while the first bundle goes through.
[ -n "${PERF:-}" ] && { perf record -q -F 999 -g -p "$SHIPPERD_PID" -o "$PERF" & PERF_PID=$!; }
run "$W/bundle.tar" bench.tar
[ -n "${PERF:-}" ] && { kill -INT "$PERF_PID"; wait "$PERF_PID" || true; }
E2E=$T_E2E PUB=$T_PUB
CPU_S=$(echo "$(cpu "$SHIPPERD_PID") - $C0" | bc -l) CPU_R=$(echo "$(cpu "$REG_PID") - $R0" | bc -l)
PCPU_S=$(echo "$(cpu "$SHIPPERD_PID") - ${PUB_CPU0:-0}" | bc -l) PCPU_R=$(echo "$(cpu "$REG_PID") - ${PUB_REG0:-0}" | bc -l)
HWM=$(rss VmHWM)
curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" \
  | jq -r '.images[] | "   \(.target)  \(.bytes_done)/\(.bytes_total) bytes\(if .skipped then " (skipped)" else "" end)"'

echo "== 4. Day-2: the same images in another bundle"
run "$W/day2.tar" day2.tar
SKIPPED=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq '[.images[] | select(.skipped)] | length')
IMAGES=$(wc -l <"$W/images.txt")

echo "== result ($((BYTES >> 20)) MiB of distinct blobs, $IMAGES images)"
printf '%-34s %7.2f s  %5.0f MB/s\n' "raw ceiling (curl x$PAR)" "$T_CEIL" "$(mbps "$T_CEIL")"
printf '%-34s %7.2f s  %5.0f MB/s\n' "skopeo copy --all, sequential" "$T_SKOPEO" "$(mbps "$T_SKOPEO")"
printf '%-34s %7.2f s  %5.0f MB/s\n' "ShipperD upload → Published" "$E2E" "$(mbps "$E2E")"
printf '%-34s %7.2f s  %5.0f MB/s\n' "ShipperD publish alone" "$PUB" "$(mbps "$PUB")"
printf '%-34s %7.2f    (target ≤ 0.60)\n' "publish / skopeo" "$(echo "$PUB / $T_SKOPEO" | bc -l)"
printf '%-34s %7.2f    (target ≤ 1.25)\n' "publish / ceiling" "$(echo "$PUB / $T_CEIL" | bc -l)"
printf '%-34s %7d MiB before, %d MiB peak (VmHWM)\n' "shipperd all RSS" $((RSS0 / 1024)) $((HWM / 1024))
printf '%-34s %7.2f s shipperd (upload, unpack, publish), %.2f s registry\n' "CPU time, first bundle" "$CPU_S" "$CPU_R"
printf '%-34s %7.2f s shipperd, %.2f s registry\n' "CPU time, publishing alone" "$PCPU_S" "$PCPU_R"
printf '%-34s %7.2f s with curl, %.2f s with skopeo\n' "registry CPU time, the others" "$CPU_CEIL" "$CPU_SKOPEO"
printf '%-34s %7.2f s publish alone, %.2f s upload → Published; %d of %d images skipped\n' \
  "Day-2 (all present)" "$T_PUB" "$T_E2E" "$SKIPPED" "$IMAGES"
