#!/usr/bin/env bash
# The carry side (release build, loopback): the same image set, held by a docker-registry
# (the connected side's source, filled with skopeo first, not timed), made into a bundle
#   1. today's way: `skopeo copy --all` of each image into one OCI layout, then
#      `mksquashfs` (zstd, as ShipperD writes);
#   2. by `shipperd create` into a squashfs, from an empty cache;
# the two taking turns, ROUNDS times; times, peak RSS (`/usr/bin/time`'s maximum resident
# set) and output sizes, each round's pair and the median ratio (goal: ≤ 0.5, RSS ≤ 100
# MiB). Then Day 2: a site (`shipperd all` with its own registry) publishes the full
# bundle and exports its inventory; the source gets a new tag of an image (a new layer on
# the shared base) and a second tag of another; `shipperd create --have` makes the delta,
# which is measured against the full bundle and against the new images' own bytes (goal:
# ≤ 1.05), and published at the site.
#   scripts/bench-create.sh [ROUNDS] [BASE_MB OWN_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BASE_MB=${2:-100}
OWN_MB=${3:-60}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench-create/site
source scripts/lib.sh
W=.bench-create
rm -rf "$W"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W"' EXIT

echo "== the image set"
$BIN/shipperd-dev bench-bundle --dir "$W" --base-mb "$BASE_MB" --own-mb "$OWN_MB"
IMAGES=$(wc -l <"$W/images.txt")
start_registry source
SRC=127.0.0.1:$RP
while read -r ref; do
  skopeo copy -q --all --dest-tls-verify=false "oci:$W/layout:$ref" "docker://$SRC/${ref#*/}" >/dev/null
done <"$W/images.txt"
sed "s|^[^/]*/|$SRC/|" "$W/images.txt" >"$W/list.txt"
rm -rf "$W/layout" "$W"/*.tar

declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
median() { tr ' ' '\n' <<<"${R[$1]}" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
range() { tr ' ' '\n' <<<"${R[$1]}" | grep . | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }
size_mib() { echo "$(stat -c %s "$1") / 1048576" | bc -l; }

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  rm -rf "$W/oci" "$W/today.squashfs" "$W/cache" "$W/create.squashfs"
  sync
  T0=$(now)
  while read -r ref; do
    repo=${ref#*/}
    skopeo copy -q --all --src-tls-verify=false "docker://$ref" "oci:$W/oci:$repo" >/dev/null
  done <"$W/list.txt"
  /usr/bin/time -f '%M' -o "$W/mksq.rss" \
    mksquashfs "$W/oci" "$W/today.squashfs" -noappend -quiet -no-progress -comp zstd >/dev/null
  sync
  add today "$(secs "$T0" "$(now)")"
  add today_rss "$(($(cat "$W/mksq.rss") / 1024))"
  rm -rf "$W/oci"
  sync

  T0=$(now)
  /usr/bin/time -f '%M' -o "$W/create.rss" \
    $BIN/shipperd create "$W/create.squashfs" --images "$W/list.txt" --cache-dir "$W/cache" >/dev/null
  sync
  add create "$(secs "$T0" "$(now)")"
  add create_rss "$(($(cat "$W/create.rss") / 1024))"
  add ratio "$(echo "$(tr ' ' '\n' <<<"${R[create]}" | tail -1) / $(tr ' ' '\n' <<<"${R[today]}" | tail -1)" | bc -l)"
  printf '   today %6.2f s (mksquashfs peak %s MiB, %.1f MiB)   create %6.2f s (peak %s MiB, %.1f MiB)   ratio %.2f\n' \
    "$(tr ' ' '\n' <<<"${R[today]}" | tail -1)" "$(tr ' ' '\n' <<<"${R[today_rss]}" | tail -1)" \
    "$(size_mib "$W/today.squashfs")" "$(tr ' ' '\n' <<<"${R[create]}" | tail -1)" \
    "$(tr ' ' '\n' <<<"${R[create_rss]}" | tail -1)" "$(size_mib "$W/create.squashfs")" \
    "$(tr ' ' '\n' <<<"${R[ratio]}" | tail -1)"
done
FULL_MIB=$(size_mib "$W/create.squashfs")

echo "== Day 2: the site publishes the full bundle and says what it has"
RUST_LOG=warn start_stack >/dev/null
upload "$W/create.squashfs" full.squashfs >/dev/null
wait_done
[ "$PHASE" = Published ] || { echo "the full bundle ended $PHASE" >&2; exit 1; }
$BIN/shipperd inventory --server "http://127.0.0.1:$API_PORT" -o "$W/inventory.json"
INV_KIB=$(($(stat -c %s "$W/inventory.json") / 1024))

echo "== Day 2 at the source: bench/app0:2.0 (a new $OWN_MB MiB layer on the base), bench/app1:1.0-again"
push_blob() { # file → prints its digest
  local d loc
  d="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
  loc=$(curl -sS -D - -o /dev/null -X POST "http://$SRC/v2/bench/app0/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
  case "$loc" in http*) ;; *) loc="http://$SRC$loc" ;; esac
  curl -sS --fail -X PUT -H 'content-type: application/octet-stream' --data-binary "@$1" "$loc&digest=$d" -o /dev/null
  echo "$d"
}
MT=application/vnd.oci.image.manifest.v1+json
curl -sS -H "accept: $MT" "http://$SRC/v2/bench/app0/manifests/1.0" >"$W/m1.json"
CFG=$(jq -r .config.digest "$W/m1.json")
curl -sS "http://$SRC/v2/bench/app0/blobs/$CFG" >"$W/c1.json"
head -c $((OWN_MB << 20)) /dev/urandom >"$W/new.tar"
DIFF="sha256:$(sha256sum "$W/new.tar" | cut -d' ' -f1)"
gzip -1 -n -c "$W/new.tar" >"$W/new.tar.gz"
LAYER=$(push_blob "$W/new.tar.gz")
jq -c --arg d "$DIFF" '.rootfs.diff_ids += [$d]' "$W/c1.json" >"$W/c2.json"
CFG2=$(push_blob "$W/c2.json")
jq -c --arg l "$LAYER" --argjson ls "$(stat -c %s "$W/new.tar.gz")" \
  --arg c "$CFG2" --argjson cs "$(stat -c %s "$W/c2.json")" \
  '.config.digest = $c | .config.size = $cs | .layers += [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": $l, "size": $ls}]' \
  "$W/m1.json" >"$W/m2.json"
curl -sS --fail -X PUT -H "content-type: $MT" --data-binary "@$W/m2.json" "http://$SRC/v2/bench/app0/manifests/2.0" -o /dev/null
curl -sS -H "accept: $MT" "http://$SRC/v2/bench/app1/manifests/1.0" >"$W/m3.json"
curl -sS --fail -X PUT -H "content-type: $MT" --data-binary "@$W/m3.json" "http://$SRC/v2/bench/app1/manifests/1.0-again" -o /dev/null
OWN=$(($(stat -c %s "$W/new.tar.gz") + $(stat -c %s "$W/c2.json") + $(stat -c %s "$W/m2.json")))
printf '%s\n%s\n' "$SRC/bench/app0:2.0" "$SRC/bench/app1:1.0-again" >>"$W/list.txt"

T0=$(now)
$BIN/shipperd create "$W/delta.tar" --images "$W/list.txt" --cache-dir "$W/cache" --have "$W/inventory.json" >/dev/null
DELTA_T=$(secs "$T0" "$(now)")
DELTA=$(stat -c %s "$W/delta.tar")
upload "$W/delta.tar" delta.tar >/dev/null
wait_done
[ "$PHASE" = Published ] || { echo "the delta ended $PHASE" >&2; exit 1; }
for ref in bench/app0:2.0 bench/app1:1.0-again; do
  curl -sS --fail -o /dev/null -H "accept: $MT" "http://127.0.0.1:$REG_PORT/v2/mirror/${ref%:*}/manifests/${ref#*:}" \
    || { echo "$ref is not at the site" >&2; exit 1; }
done

ratio() { echo "$(median "$1") / $(median "$2")" | bc -l; }
echo "== result: medians of $ROUNDS rounds (range), $IMAGES images, $(printf '%.0f' "$FULL_MIB") MiB squashfs"
printf '%-52s %7.2f s  (%s)\n' "today: skopeo copy --all into one layout + mksquashfs" "$(median today)" "$(range today)"
printf '%-52s %7.2f s  (%s)\n' "shipperd create, empty cache" "$(median create)" "$(range create)"
printf '%-52s %7.2f     (%s)  (target ≤ 0.50)\n' "create / today" "$(median ratio)" "$(range ratio)"
printf '%-52s %7s MiB (%s)  (target ≤ 100)\n' "create peak RSS" "$(median create_rss)" "$(range create_rss)"
printf '%-52s %7s MiB\n' "mksquashfs peak RSS" "$(median today_rss)"
printf '%-52s %7d KiB\n' "the site's inventory" "$INV_KIB"
printf '%-52s %7.2f s\n' "Day-2 delta: create --have (cache warm)" "$DELTA_T"
printf '%-52s %7.2f MiB (full bundle %.1f MiB)\n' "Day-2 delta: its size" "$(echo "$DELTA / 1048576" | bc -l)" "$FULL_MIB"
printf '%-52s %7.3f     (target ≤ 1.05)\n' "delta / the new images' own bytes" "$(echo "$DELTA / $OWN" | bc -l)"
