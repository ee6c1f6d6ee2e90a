#!/usr/bin/env bash
# The test command from the README: fetch the real model the tests use (once), then run every
# test in release mode. GPU tests print that they skipped where no CUDA device exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo test --release "$@"
