#!/usr/bin/env bash
# The whole test suite: installs the real servers the tests start, then runs every
# test of the workspace (unit tests and the end-to-end tests in tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --locked "$@"
