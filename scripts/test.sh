#!/usr/bin/env bash
# The test command from the README: fetch the real model the tests use (once), then run every
# test in release mode. GPU tests print that they skipped where no CUDA device exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo test --release "$@"
if [ $# -eq 0 ]; then
  # The GPU check rehearsed without a GPU (its tests skip): building and packing what travels
  # under the 64 MiB limit, unpacking it, the library search, the steps and the logs break here
  # first, not in the few minutes of a device session.
  scripts/gpu-prepare.sh >/dev/null
  out=$(mktemp -d)
  DRY=1 OUT="$out" bash scripts/gpu-check.sh >"$out/check.txt" 2>&1 || { cat "$out/check.txt"; exit 1; }
  rm -rf "$out"
fi
