#!/usr/bin/env bash
# The whole test suite: installs the real servers the tests start, then runs every
# test of the workspace (unit tests and the end-to-end tests in tests/). Arguments go
# to `cargo test` instead (e.g. `scripts/test.sh -p shipperd-tests --test e2e -- ui::`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The end-to-end tests mostly wait on real servers: four at a time, but for the
# exposure tests, which count connections and time slow clients and run on their own
# afterwards.
# (--tests: every target with `test = true`, the default; not doc tests, of which there
# are none, but each crate's doc-test pass would still cost a rustdoc run. Targets with
# `test = false` have no tests (tests/tests/layout.rs checks) and are not built for them.)
if [ $# -eq 0 ]; then
  cargo test --workspace --locked --tests -- --test-threads 4 --skip exposure::
  cargo test --locked -p shipperd-tests --test e2e -- --test-threads 2 exposure::
else
  cargo test --workspace --locked "$@"
fi
