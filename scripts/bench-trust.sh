#!/usr/bin/env bash
# The cost of the site's signature policy at scale (release build, loopback): one bundle
# of N small catalog images, each signed as cosign signs (a `sha256-<hex>.sig` image
# beside it, made by scripts/cosign-sign-layout.py with Python's `cryptography`), so
# 2N images in all. The same bundle is published by a fresh `shipperd all` into a fresh
# registry ROUNDS times each way, interleaved: without a policy, and with `--policy`
# requiring every image's signature. Prints each round's upload → Published, unpack
# (where the check runs) and peak RSS, and the ratio of the medians.
#   scripts/bench-trust.sh [N] [ROUNDS]     (default 3000 images, 1 round)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
ROUNDS=${2:-1}
scripts/install-deps.sh
echo "== building (release)"
cargo build --locked --release -q -p shipperd -p shipperd-tests --bins
BIN=target/release
DEMO=.bench
source scripts/lib.sh
W=.bench-trust
rm -rf "$W"; mkdir -p "$W"
trap 'cleanup; rm -rf "$W"' EXIT

echo "== building a bundle of $N images, and signing each"
$BIN/shipperd-dev catalog-bundle --dir "$W" --images "$N" >/dev/null
python3 scripts/cosign-sign-layout.py "$W/layout" "$PWD/$W/cosign.pub"
tar -C "$W/layout" -cf "$W/signed.tar" .
ls -l "$W/signed.tar" | awk '{printf "   signed.tar: %.1f MiB\n", $5 / 1048576}'
cat >"$W/policy.json" <<JSON
{"default": [{"type": "reject"}],
 "transports": {"docker": {"registry.example.com": [{"type": "sigstoreSigned",
   "keyPath": "$PWD/$W/cosign.pub", "signedIdentity": {"type": "matchRepository"}}]}}}
JSON

# The signature images count as images: raise the limit for the 2N.
export SHIPPERD_MAX_IMAGES=$((2 * N + 100))

# run LABEL [POLICY]: one fresh stack, the bundle to Published; appends a line to $W/runs.
run() {
  if [ -n "${2:-}" ]; then export SHIPPERD_POLICY="$2"; else unset SHIPPERD_POLICY; fi
  RUST_LOG=warn start_stack >/dev/null
  local t0 rec e2e unpack publish hwm
  t0=$(now)
  upload "$W/signed.tar" signed.tar >/dev/null
  for _ in $(seq 1 18000); do
    PHASE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0" | jq -r .phase)
    case "$PHASE" in Published|Failed) break;; esac
    sleep 0.2
  done
  e2e=$(secs "$t0" "$(now)")
  rec=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0")
  [ "$PHASE" = Published ] || { echo "$1: the bundle ended $PHASE: $(jq -r .error <<<"$rec")" >&2; exit 1; }
  unpack=$(secs "$(date -d "$(jq -r .received_at <<<"$rec")" +%s.%N)" "$(date -d "$(jq -r .unpacked_at <<<"$rec")" +%s.%N)")
  publish=$(secs "$(date -d "$(jq -r .unpacked_at <<<"$rec")" +%s.%N)" "$(date -d "$(jq -r .finished_at <<<"$rec")" +%s.%N)")
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$SHIPPERD_PID/status")
  printf "%s %.2f %.2f %.2f %d %s\n" "$1" "$e2e" "$unpack" "$publish" "$((hwm / 1024))" \
    "$(jq -c '.verification // {} | {signed, unsigned}' <<<"$rec")" | tee -a "$W/runs"
  cleanup; PIDS=()
}

echo "== $ROUNDS round(s), each: without a policy, then with --policy (label e2e_s unpack_s publish_s peak_MiB)"
for r in $(seq 1 "$ROUNDS"); do
  run plain
  run policy "$PWD/$W/policy.json"
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
P=$(awk '$1=="plain" {print $2}' "$W/runs" | median)
S=$(awk '$1=="policy" {print $2}' "$W/runs" | median)
PU=$(awk '$1=="plain" {print $3}' "$W/runs" | median)
SU=$(awk '$1=="policy" {print $3}' "$W/runs" | median)
echo "== result ($N images + $N signature images; medians of $ROUNDS)"
printf "   upload -> Published: %.1f s plain, %.1f s with the policy: %.3f (goal <= 1.10)\n" "$P" "$S" "$(echo "$S / $P" | bc -l)"
printf "   unpack (reads, checks): %.1f s plain, %.1f s with the policy (+%.1f s, %.1f ms per signed image)\n" \
  "$PU" "$SU" "$(echo "$SU - $PU" | bc -l)" "$(echo "($SU - $PU) * 1000 / $N" | bc -l)"
