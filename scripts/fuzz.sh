#!/usr/bin/env bash
# Fuzzes the bundle readers with cargo-fuzz (libFuzzer), each target for a bounded time.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Targets: detect, tar (index + expansion), squashfs, squashfs_tables (the bounds on its
# metadata, before backhand), oci_layout, registry_tree.
# Seeds come from fuzz/corpus/<target> (committed, replayed by `cargo test`); what the
# fuzzer finds goes to fuzz/target/work/<target>, crashes to fuzz/artifacts/<target>.
# Needs the nightly toolchain (rustup) and cargo-fuzz, installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(detect tar squashfs squashfs_tables oci_layout registry_tree)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd fuzz

status=0
for t in "${targets[@]}"; do
  mkdir -p "target/work/$t"
  log="target/work/$t.log"
  echo "== $t: ${secs}s"
  if cargo +nightly fuzz run "$t" "target/work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=1048576 \
      -print_final_stats=1 >"$log" 2>&1; then
    echo "   ok: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs," \
         "$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}')/s," \
         "corpus $(ls "target/work/$t" | wc -l) inputs"
  else
    status=1
    echo "   CRASH: see fuzz/$log and fuzz/artifacts/$t"
    tail -30 "$log"
  fi
done
exit $status
