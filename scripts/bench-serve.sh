#!/usr/bin/env bash
# Day-0 serving speed (release build, loopback): every image of a ~0.9 GiB bundle pulled
# with parallel `skopeo copy --all` (into `dir:` layouts on /dev/shm, so the client's disk
# is not what is measured)
#   1. from docker-registry, serving the same images from its own storage (pushed there
#      first, not timed);
#   2. from `shipperd serve` of the bundle as a plain tar, read in place;
#   3. from `shipperd serve` of the same layout squashed (mksquashfs, zstd);
# and the same blobs fetched with parallel `curl` (the servers alone, no client-side
# hashing). Each pull is run ROUNDS times, the servers taking turns, the best kept; the
# files are in the page cache for all of them (one untimed pull first). Prints each time, its ratio to docker-registry's (goal: ≤ 1.0),
# and the peak resident memory of `shipperd serve` (goal: under 100 MiB).
#   scripts/bench-serve.sh [PARALLEL] [ROUNDS] [BASE_MB OWN_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
PAR=${1:-4}
ROUNDS=${2:-2}
BASE_MB=${3:-150}
OWN_MB=${4:-110}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
W=.bench-serve
OUT=/dev/shm/shipperd-bench-serve
rm -rf "$W" "$OUT"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W" "$OUT"' EXIT

echo "== building the bundle"
$BIN/shipperd-dev bench-bundle --dir "$W" --base-mb "$BASE_MB" --own-mb "$OWN_MB"
mksquashfs "$W/layout" "$W/bundle.squashfs" -noappend -quiet -no-progress -comp zstd
BYTES=$(awk '{s += $2} END {print s}' "$W/blobs.txt")
IMAGES=$(wc -l <"$W/images.txt")

echo "== docker-registry, filled with skopeo (not timed)"
start_registry registry
REG_PORT=$RP REG_PID=$RPID
while read -r ref; do
  skopeo copy -q --all --dest-tls-verify=false "oci:$W/layout:$ref" \
    "docker://127.0.0.1:$REG_PORT/${ref#*/}" >/dev/null
done <"$W/images.txt"

# serve FILE: `shipperd serve` of FILE on a free port; sets SP and SPID.
serve() {
  SP=$($BIN/shipperd-dev free-port)
  RUST_LOG=warn $BIN/shipperd serve --listen "127.0.0.1:$SP" "$1" >"$W/serve-$SP.log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  wait_port "$SP" "shipperd serve"
}
serve "$W/bundle.tar"; TAR_PORT=$SP TAR_PID=$SPID
serve "$W/bundle.squashfs"; SQ_PORT=$SP SQ_PID=$SPID
hwm() { awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }
RSS_TAR0=$(hwm "$TAR_PID") RSS_SQ0=$(hwm "$SQ_PID")

export OUT
pull() { # port ref n
  skopeo copy -q --all --src-tls-verify=false "docker://127.0.0.1:$1/${2#*/}" "dir:$OUT/$3" >/dev/null
}
export -f pull
fetch() { # port repo digest: one blob through curl
  curl -sS --fail -o /dev/null "http://127.0.0.1:$1/v2/$2/blobs/$3"
}
export -f fetch
# pull_all PORT: one parallel pull of every image; sets T. skopeo checks every digest
# it copies.
pull_all() {
  rm -rf "$OUT"; mkdir -p "$OUT"
  local t0
  t0=$(now)
  nl -ba "$W/images.txt" | xargs -P "$PAR" -L 1 bash -c 'pull '"$1"' "$1" "$0"'
  T=$(secs "$t0" "$(now)")
}
# fetch_all PORT: every distinct blob through curl, PAR at a time; sets T.
fetch_all() {
  local t0
  t0=$(now)
  xargs -P "$PAR" -L 1 bash -c 'fetch '"$1"' "$0" "$1"' <"$W/fetch.txt"
  T=$(secs "$t0" "$(now)")
}
min() { if [ -z "$1" ] || [ "$(echo "$2 < $1" | bc -l)" = 1 ]; then echo "$2"; else echo "$1"; fi; }
echo "== pulling every image, $PAR at a time, best of $ROUNDS (the servers taking turns)"
pull_all "$REG_PORT"
# What curl fetches: each distinct blob (manifests too) once, from a repository holding
# it, as that pull laid them out (`dir:` names each file by its digest's hex).
n=0
while read -r ref; do
  n=$((n + 1)); repo=${ref#*/}; repo=${repo%:*}
  for f in "$OUT/$n"/*; do
    b=$(basename "$f")
    if [ ${#b} = 64 ]; then echo "$repo sha256:$b"; fi
  done
done <"$W/images.txt" | sort -u -k2,2 >"$W/fetch.txt"
FETCHED=$(awk '{print $2}' "$W/fetch.txt" | while read -r d; do stat -c %s "$OUT"/*/"${d#sha256:}" 2>/dev/null | head -1; done | awk '{s += $1} END {print s}')
PULLED=$(du -sb "$OUT" | cut -f1)
T_REG="" T_TAR="" T_SQ=""
CPU_REG0=$(cpu "$REG_PID") CPU_TAR0=$(cpu "$TAR_PID") CPU_SQ0=$(cpu "$SQ_PID")
for _ in $(seq 1 "$ROUNDS"); do
  pull_all "$REG_PORT"; T_REG=$(min "$T_REG" "$T")
  pull_all "$TAR_PORT"; T_TAR=$(min "$T_TAR" "$T")
  pull_all "$SQ_PORT"; T_SQ=$(min "$T_SQ" "$T")
done
per_pull() { echo "($(cpu "$1") - $2) / $ROUNDS" | bc -l; }
CPU_REG=$(per_pull "$REG_PID" "$CPU_REG0") CPU_TAR=$(per_pull "$TAR_PID" "$CPU_TAR0") CPU_SQ=$(per_pull "$SQ_PID" "$CPU_SQ0")
echo "== fetching every distinct blob with curl, $PAR at a time, best of $ROUNDS"
C_REG="" C_TAR="" C_SQ=""
for _ in $(seq 1 "$ROUNDS"); do
  fetch_all "$REG_PORT"; C_REG=$(min "$C_REG" "$T")
  fetch_all "$TAR_PORT"; C_TAR=$(min "$C_TAR" "$T")
  fetch_all "$SQ_PORT"; C_SQ=$(min "$C_SQ" "$T")
done
RSS_TAR=$(hwm "$TAR_PID") RSS_SQ=$(hwm "$SQ_PID")

mbps() { echo "$1 / $2 / 1000000" | bc -l; }
echo "== result: $IMAGES images, $((BYTES >> 20)) MiB of distinct blobs, $((PULLED >> 20)) MiB per full pull"
printf '%-40s %7.2f s  %5.0f MB/s\n' "skopeo x$PAR from docker-registry" "$T_REG" "$(mbps "$PULLED" "$T_REG")"
printf '%-40s %7.2f s  %5.0f MB/s  ratio %.2f (goal ≤ 1.00)\n' "skopeo x$PAR from shipperd serve (tar)" "$T_TAR" "$(mbps "$PULLED" "$T_TAR")" "$(echo "$T_TAR / $T_REG" | bc -l)"
printf '%-40s %7.2f s  %5.0f MB/s  ratio %.2f (goal ≤ 1.00)\n' "skopeo x$PAR from shipperd serve (squashfs)" "$T_SQ" "$(mbps "$PULLED" "$T_SQ")" "$(echo "$T_SQ / $T_REG" | bc -l)"
printf '%-40s %7.2f s  %5.0f MB/s\n' "curl x$PAR from docker-registry" "$C_REG" "$(mbps "$FETCHED" "$C_REG")"
printf '%-40s %7.2f s  %5.0f MB/s  ratio %.2f\n' "curl x$PAR from shipperd serve (tar)" "$C_TAR" "$(mbps "$FETCHED" "$C_TAR")" "$(echo "$C_TAR / $C_REG" | bc -l)"
printf '%-40s %7.2f s  %5.0f MB/s  ratio %.2f\n' "curl x$PAR from shipperd serve (squashfs)" "$C_SQ" "$(mbps "$FETCHED" "$C_SQ")" "$(echo "$C_SQ / $C_REG" | bc -l)"
printf '%-40s %7.2f s docker-registry, %.2f s serve (tar), %.2f s serve (squashfs)\n' "server CPU per full skopeo pull" "$CPU_REG" "$CPU_TAR" "$CPU_SQ"
printf '%-40s %4d MiB at start, %d MiB peak (tar); %d, %d MiB (squashfs) (goal < 100)\n' "shipperd serve VmHWM" "$RSS_TAR0" "$RSS_TAR" "$RSS_SQ0" "$RSS_SQ"
