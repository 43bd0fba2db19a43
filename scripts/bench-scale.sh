#!/usr/bin/env bash
# Many small images, as an operator-catalog mirror carries (release build, loopback):
#   1. the raw ceiling: the same images pushed into a fresh docker-registry by a plain
#      16-connection client (HEAD, mount or POST+PUT per blob, PUT manifest);
#   2. ShipperD end to end (upload → Published) into another fresh registry, with its
#      publish phase alone, images/s, and the peak resident memory of `shipperd all`;
#   3. sequential `skopeo copy` of a sample of the images, ms per image.
#   scripts/bench-scale.sh [N] [SKOPEO_SAMPLE]     (default 3000 images, 50 for skopeo)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
SAMPLE=${2:-50}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
W=.bench-scale
rm -rf "$W"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W"' EXIT

echo "== building a bundle of $N images"
$BIN/shipperd-dev catalog-bundle --dir "$W" --images "$N"
ls -l "$W/bundle.tar" | awk '{printf "   bundle.tar: %.1f MiB\n", $5 / 1048576}'

if [ -n "${RAW_RATE:-}" ]; then
  # A figure from an earlier run on this machine (to iterate on ShipperD alone).
  echo "== 1. raw ceiling: $RAW_RATE images/s, given (RAW_RATE)"
  RAW_OUT="given"; RAW_CPU=0
else
  echo "== 1. raw ceiling: 16 connections, fresh registry"
  start_registry raw
  # Then every manifest PUT again under a second tag, 64 at a time: what tagging last
  # adds at the registry, measured without ShipperD.
  RAW_ALL=$($BIN/shipperd-dev raw-push --layout "$W/layout" --registry "http://127.0.0.1:$RP" --connections 16 --retag 64)
  sed 's/^/   /' <<<"$RAW_ALL"
  RAW_OUT=$(grep '^raw push' <<<"$RAW_ALL")
  RETAG_OUT=$(grep '^raw retag' <<<"$RAW_ALL")
  RAW_RATE=$(sed -E 's/.* ([0-9.]+) images\/s.*/\1/' <<<"$RAW_OUT")
  TAGLAST_RATE=$(sed -E 's/.* ([0-9.]+) images\/s.*/\1/' <<<"$RETAG_OUT")
  RAW_CPU=$(cpu "$RPID")
fi

echo "== 2. ShipperD (shipperd all), fresh registry"
RUST_LOG=${RUST_LOG:-warn,shipperd_publish::commit=info} start_stack
REG_PID=$(pgrep -f "docker-registry serve $DEMO/registry.yml" | head -1)
rss() { awk "/^$1/ {print \$2}" "/proc/$SHIPPERD_PID/status"; }
RSS0=$(rss VmRSS)
C0=$(cpu "$SHIPPERD_PID") R0=$(cpu "$REG_PID") N0=$(cpu "$NATS_PID") H0=$(cpu "$HOOK_PID")
T0=$(now)
# Resident memory every half second, to see in which phase the peak falls.
( while kill -0 "$SHIPPERD_PID" 2>/dev/null; do echo "$(secs "$T0" "$(now)") $(rss VmRSS)"; sleep 0.5; done ) >"$W/rss.log" 2>/dev/null &
upload "$W/bundle.tar" catalog.tar >/dev/null
wait_done
T_E2E=$(secs "$T0" "$(now)")
[ "$PHASE" = Published ] || { echo "the bundle ended $PHASE" >&2; curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq '{error, counts}' >&2; exit 1; }
REC=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0")
T_PUB=$(secs "$(date -d "$(jq -r .unpacked_at <<<"$REC")" +%s.%N)" "$(date -d "$(jq -r .finished_at <<<"$REC")" +%s.%N)")
T_UNPACK=$(secs "$(date -d "$(jq -r .received_at <<<"$REC")" +%s.%N)" "$(date -d "$(jq -r .unpacked_at <<<"$REC")" +%s.%N)")
HWM=$(rss VmHWM)
CPU_S=$(echo "$(cpu "$SHIPPERD_PID") - $C0" | bc -l) CPU_R=$(echo "$(cpu "$REG_PID") - $R0" | bc -l)
CPU_N=$(echo "$(cpu "$NATS_PID") - $N0" | bc -l) CPU_H=$(echo "$(cpu "$HOOK_PID") - $H0" | bc -l)
PUBLISHED=$(jq .counts.published <<<"$REC")
T_TAGS=$(grep -a "tags set" "$DEMO/shipperd.log" | sed -E 's/.*secs=([0-9.]+).*/\1/' | tail -1)
PAGE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA/images?offset=$((N - 5))&limit=5" | jq '.images | length')

echo "== 3. skopeo copy, one image after another ($SAMPLE images)"
start_registry skopeo
head -n "$SAMPLE" "$W/images.txt" >"$W/sample.txt"
T0=$(now)
while read -r ref; do
  skopeo copy -q --dest-tls-verify=false "oci:$W/layout:$ref" \
    "docker://127.0.0.1:$RP/${ref#*/}" >/dev/null
done <"$W/sample.txt"
T_SKOPEO=$(secs "$T0" "$(now)")

RATE=$(echo "$N / $T_PUB" | bc -l)
RATE_E2E=$(echo "$N / $T_E2E" | bc -l)
echo "== result ($N images; $PUBLISHED published; last page of the listing: $PAGE images)"
printf '%-38s %8.1f images/s   (%s)\n' "raw ceiling, 16 connections" "$RAW_RATE" "$(sed -E 's/^raw push: //' <<<"$RAW_OUT")"
printf '%-38s %8.1f images/s   %.1f s (setting the tags: %s s)\n' "ShipperD publish (unpacked → Published)" "$RATE" "$T_PUB" "${T_TAGS:-?}"
printf '%-38s %8.1f images/s   %.1f s (unpack %.1f s)\n' "ShipperD upload → Published" "$RATE_E2E" "$T_E2E" "$T_UNPACK"
printf '%-38s %8.2f\n' "publish / raw ceiling" "$(echo "$RATE / $RAW_RATE" | bc -l)"
printf '%-38s %8.2f         (goal ≥ 0.90)\n' "end to end / raw ceiling" "$(echo "$RATE_E2E / $RAW_RATE" | bc -l)"
if [ -n "${TAGLAST_RATE:-}" ]; then
  printf '%-38s %8.1f images/s   (%s)\n' "raw push + a second tag PUT per image" "$TAGLAST_RATE" "$(sed -E 's/^raw retag: //' <<<"$RETAG_OUT")"
  printf '%-38s %8.2f\n' "end to end / (raw push + retag)" "$(echo "$RATE_E2E / $TAGLAST_RATE" | bc -l)"
fi
PEAK_AT=$(sort -k2 -n "$W/rss.log" | tail -1 | cut -d' ' -f1)
# RSS (MiB) at each tenth of the run.
TIMELINE=$(awk -v t="$T_E2E" '{ i = int(10 * $1 / t); if (i > 10) i = 10; v[i] = int($2 / 1024) } END { for (i = 0; i <= 10; i++) printf "%s%s", (i ? " " : ""), v[i] }' "$W/rss.log")
printf '%-38s %8d MiB before, %d MiB peak (VmHWM; goal ≤ 100), at %.0f s of %.0f\n' "shipperd all RSS" $((RSS0 / 1024)) $((HWM / 1024)) "${PEAK_AT:-0}" "$T_E2E"
printf '%-38s %s\n' "RSS at each tenth of the run (MiB)" "$TIMELINE"
printf '%-38s %8.1f s shipperd, %.1f s registry, %.1f s nats-server, %.1f s webhook receiver (raw client: registry %.1f s)\n' "CPU time" "$CPU_S" "$CPU_R" "$CPU_N" "$CPU_H" "$RAW_CPU"
printf '%-38s %8.0f ms/image (%s images)\n' "skopeo copy, sequential" "$(echo "$T_SKOPEO * 1000 / $SAMPLE" | bc -l)" "$SAMPLE"
