#!/usr/bin/env bash
# The README's first command: build, fetch the real MiniLM-L6 checkpoint, inspect it, then
# generate a small synthetic base + 3 experts and merge them with every training-free method
# (configs/demo-*.yml). Everything lands in target/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=target/release/symerge
scripts/fetch-assets.sh >/dev/null
echo "== inspect the real MiniLM-L6 checkpoint"
$bin inspect target/assets/minilm
echo "== generate a synthetic Llama-shaped base + 3 experts"
rm -rf target/demo
$bin generate --preset llama-tiny --experts 3 -o target/demo/models
for method in linear task_arithmetic ties dare_linear dare_ties; do
  echo "== merge: $method"
  $bin merge "configs/demo-$method.yml" -o "target/demo/merged-$method" --json | grep -E '"(method|tensors|bytes_read|read_gb_per_s)"'
done
$bin inspect target/demo/merged-ties
