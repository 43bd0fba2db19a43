#!/usr/bin/env bash
# End to end against what sites do today, on loopback (release build), in ROUNDS rounds
# (default 5), medians printed at the end. This machine's disk is noisy: every side
# that writes ends with `sync` and each round runs every side once, so the ratios
# compare like with like.
#
# The bundle: an uncompressed squashfs of an OCI layout holding seven images (one a
# two-platform index; eight platform images) sharing a base layer, each image's own
# bytes in OWN_LAYERS layers (about 1 GiB with the defaults). Per round:
#   1. today: `unsquashfs` + `skopeo copy --all` of each image, one after the other,
#      into a fresh docker-registry, then `sync`;
#   2. the raw ceiling: every distinct blob uploaded by 4 parallel `curl`s (POST, PUT)
#      into a fresh docker-registry;
#   3. the disk: `dd conv=fdatasync` of the bundle into ShipperD's data directory;
#   4. ShipperD (a fresh stack): PUT, then until Published, then `sync`; the PUT alone;
#      publishing alone (the bundle record's unpacked_at → finished_at);
#   5. Day-2: the same images in another squashfs: from the PUT's answer to Published.
#   scripts/bench-e2e.sh [ROUNDS] [BASE_MB OWN_MB OWN_LAYERS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
BASE_MB=${2:-170}
OWN_MB=${3:-120}
OWN_LAYERS=${4:-8}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
W=.bench-e2e
rm -rf "$W" "$DEMO"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W" "$DEMO"' EXIT

echo "== building the bundle"
$BIN/shipperd-dev bench-bundle --dir "$W" --base-mb "$BASE_MB" --own-mb "$OWN_MB" \
  --own-layers "$OWN_LAYERS"
rm -f "$W/bundle.tar" "$W/day2.tar"
SQUASH=(-noappend -quiet -no-progress -noI -noId -noD -noF -noX -no-xattrs)
mksquashfs "$W/layout" "$W/bundle.squashfs" "${SQUASH[@]}" >/dev/null
cp -al "$W/layout" "$W/layout2"
echo "the same images, in another bundle" >"$W/layout2/day2.txt"
mksquashfs "$W/layout2" "$W/day2.squashfs" "${SQUASH[@]}" >/dev/null
rm -rf "$W/layout2"
BYTES=$(stat -c %s "$W/bundle.squashfs")
IMAGES=$(wc -l <"$W/images.txt")
echo "   $((BYTES >> 20)) MiB squashfs, $IMAGES images"

export W
upload_blob() { # DIGEST: POST + PUT of one blob into the ceiling registry
  local d=$1 loc
  loc=$(curl -sS -X POST -D - -o /dev/null "http://127.0.0.1:$RP/v2/ceiling/blobs/uploads/" \
    | awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
  curl -sS --fail -X PUT -T "$W/layout/blobs/sha256/${d#sha256:}" \
    -H 'content-type: application/octet-stream' "$loc&digest=$d" -o /dev/null
}
export -f upload_blob

# phase_of SHA: the bundle's phase.
phase_of() { curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$1?limit=0" | jq -r .phase; }
# until_done SHA: polls every 10 ms (10 min at most); fails unless Published.
until_done() {
  local p
  for _ in $(seq 1 60000); do
    p=$(phase_of "$1")
    case "$p" in Published) return 0 ;; Failed) echo "bundle $1 failed" >&2; exit 1 ;; esac
    sleep 0.01
  done
  echo "bundle $1 did not finish" >&2
  exit 1
}
record_secs() { # SHA FROM TO: seconds between two timestamps of the bundle's record
  local rec
  rec=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$1?limit=0")
  secs "$(date -d "$(jq -r ".$2" <<<"$rec")" +%s.%N)" "$(date -d "$(jq -r ".$3" <<<"$rec")" +%s.%N)"
}

declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
median() { tr ' ' '\n' <<<"${R[$1]}" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
range() { tr ' ' '\n' <<<"${R[$1]}" | grep . | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  sync
  # 1. Today's way.
  start_registry "skopeo$round"
  T0=$(now)
  unsquashfs -q -n -d "$W/x" "$W/bundle.squashfs" >/dev/null
  while read -r ref; do
    skopeo copy -q --all --dest-tls-verify=false "oci:$W/x:$ref" \
      "docker://127.0.0.1:$RP/${ref#*/}" >/dev/null
  done <"$W/images.txt"
  sync
  add today "$(secs "$T0" "$(now)")"
  rm -rf "$W/x" "$W/skopeo$round"
  sync

  # 2. The raw ceiling.
  start_registry "ceiling$round"; export RP
  T0=$(now)
  cut -d' ' -f1 "$W/blobs.txt" | xargs -P 4 -n 1 bash -c 'upload_blob "$0"'
  add ceiling "$(secs "$T0" "$(now)")"
  sync
  rm -rf "$W/ceiling$round"
  cleanup; PIDS=()

  # 4. ShipperD, on a fresh stack; 3. the disk, on its data directory.
  RUST_LOG=warn start_stack >/dev/null
  mkdir -p "$DEMO/data/tmp"
  sync
  T0=$(now)
  dd if="$W/bundle.squashfs" of="$DEMO/data/tmp/dd" bs=4M conv=fdatasync status=none
  add dd "$(secs "$T0" "$(now)")"
  rm -f "$DEMO/data/tmp/dd"
  sync
  SHA=$(sha256sum "$W/bundle.squashfs" | cut -d' ' -f1)
  T0=$(now)
  curl -sS --fail-with-body -T "$W/bundle.squashfs" \
    "http://127.0.0.1:$API_PORT/v1/bundles/bench.squashfs?sha256=$SHA" -o /dev/null
  T1=$(now)
  until_done "$SHA"
  sync
  add e2e "$(secs "$T0" "$(now)")"
  add put "$(secs "$T0" "$T1")"
  add publish "$(record_secs "$SHA" unpacked_at finished_at)"
  add unpack "$(record_secs "$SHA" received_at unpacked_at)"

  # 5. Day-2.
  SHA=$(sha256sum "$W/day2.squashfs" | cut -d' ' -f1)
  curl -sS --fail-with-body -T "$W/day2.squashfs" \
    "http://127.0.0.1:$API_PORT/v1/bundles/day2.squashfs?sha256=$SHA" -o /dev/null
  T1=$(now)
  until_done "$SHA"
  add day2 "$(secs "$T1" "$(now)")"
  SKIPPED=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0" | jq .counts.skipped)
  [ "$SKIPPED" = "$IMAGES" ] || { echo "Day-2 skipped $SKIPPED of $IMAGES images" >&2; exit 1; }
  cleanup; PIDS=()
  for k in today ceiling dd put e2e publish day2; do
    printf '   %-8s %6.2f s\n' "$k" "$(tr ' ' '\n' <<<"${R[$k]}" | grep . | tail -1)"
  done
done

ratio() { echo "$(median "$1") / $(median "$2")" | bc -l; }
echo "== result: medians of $ROUNDS rounds (range), $((BYTES >> 20)) MiB squashfs, $IMAGES images"
printf '%-46s %6.2f s  (%s)\n' "today: unsquashfs + skopeo copy --all, sync" "$(median today)" "$(range today)"
printf '%-46s %6.2f s  (%s)\n' "ShipperD: PUT → Published, sync" "$(median e2e)" "$(range e2e)"
printf '%-46s %6.2f     (target ≤ 0.60)\n' "ShipperD / today" "$(ratio e2e today)"
printf '%-46s %6.2f s  (%s)\n' "  the PUT" "$(median put)" "$(range put)"
printf '%-46s %6.2f s  (%s)\n' "  dd conv=fdatasync of the same file" "$(median dd)" "$(range dd)"
printf '%-46s %6.2f     (target ≤ 1.20)\n' "  PUT / dd" "$(ratio put dd)"
printf '%-46s %6.2f s  (%s)\n' "  unpack (received → unpacked)" "$(median unpack)" "$(range unpack)"
printf '%-46s %6.2f s  (%s)\n' "  publish (unpacked → Published)" "$(median publish)" "$(range publish)"
printf '%-46s %6.2f s  (%s)\n' "raw ceiling: 4 parallel curl uploads" "$(median ceiling)" "$(range ceiling)"
printf '%-46s %6.2f     (target ≤ 1.10)\n' "publish / ceiling" "$(ratio publish ceiling)"
printf '%-46s %6.3f s  (%s)  (target < 0.3)\n' "Day-2 (all present): PUT answered → Published" "$(median day2)" "$(range day2)"
