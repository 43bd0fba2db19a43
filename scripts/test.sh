#!/usr/bin/env bash
# The whole test suite: installs the real servers the tests start, then runs every
# test of the workspace (unit tests and the end-to-end tests in tests/). Arguments go
# to `cargo test` instead (e.g. `scripts/test.sh -p shipperd-tests --test e2e -- ui::`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 0 ]; then
  scripts/install-deps.sh
  exec cargo test --workspace --locked "$@"
fi

# The servers and tools are installed while the tests build (the build needs none of
# them; on a fresh machine that is apt-get and pip's time saved), and waited for before
# any test runs.
deps_log="$(mktemp)"
trap 'rm -f "$deps_log"' EXIT
scripts/install-deps.sh >"$deps_log" 2>&1 &
deps=$!
# (--tests: every target with `test = true`, the default; not doc tests, of which there
# are none, but each crate's doc-test pass would still cost a rustdoc run. Targets with
# `test = false` have no tests (tests/tests/layout.rs checks) and are not built for them.)
if ! cargo test --workspace --locked --tests --no-run; then
  wait "$deps" || true
  exit 1
fi
if ! wait "$deps"; then
  cat "$deps_log" >&2
  echo "scripts/install-deps.sh failed" >&2
  exit 1
fi
cat "$deps_log" >&2
# The end-to-end tests mostly wait on real servers: four at a time, but for the
# exposure tests, which count connections and time slow clients and run on their own
# afterwards.
cargo test --workspace --locked --tests -- --test-threads 4 --skip exposure::
cargo test --locked -p shipperd-tests --test e2e -- --test-threads 2 exposure::
