#!/usr/bin/env bash
# Builds, on any x86-64 machine (no GPU or CUDA needed), what scripts/gpu-check.sh runs on the
# GPU machine, and copies it into .devbin/ (git-ignored; carry it to the device):
#   .devbin/exe.tar.xz                   the CLI (symerge: bench-cuda, merge --device cuda) and the
#                                        GPU test executables (gpu_kernels, gpu_merge, kernels_compile,
#                                        device_flag, gpu_backend, gpu_nccl), stripped and
#                                        xz-compressed (7 MB instead of 34: with the tracked tree and
#                                        the MiniLM loose they came to 71 MiB, over the 64 MiB limit)
#   .devbin/minilm.tar.xz                the real MiniLM-L6 for tests/gpu_backend.rs, in bf16 and
#                                        xz-compressed (32 MB instead of 91: it travels with the
#                                        executables under the 64 MiB limit; CPU and GPU read the same
#                                        weights, so the half precision costs the comparison nothing)
# Usage: scripts/gpu-prepare.sh            (JOBS=1 to limit parallel compilation)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
jobs=()
[ -n "${JOBS:-}" ] && jobs=(-j "$JOBS")
cargo build --release --bin symerge "${jobs[@]}"
mkdir -p .devbin
rm -f .devbin/*
cargo test --release --no-run --message-format=json "${jobs[@]}" \
  --test gpu_kernels --test gpu_merge --test kernels_compile --test device_flag --test gpu_backend --test gpu_nccl |
  python3 -c '
import json, shutil, sys
wanted = {"gpu_kernels", "gpu_merge", "kernels_compile", "device_flag", "gpu_backend", "gpu_nccl"}
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] in wanted:
        shutil.copy(msg["executable"], ".devbin/" + msg["target"]["name"])
        wanted.discard(msg["target"]["name"])
if wanted:
    sys.exit("missing test executables: " + ", ".join(sorted(wanted)))
'
cp "$CARGO_TARGET_DIR/release/symerge" .devbin/symerge
# Debug symbols are not needed there, and the tree that travels is limited to 64 MiB.
strip .devbin/* 2>/dev/null || true
minilm="${SYMERGE_MINILM:-$PWD/target/assets/minilm}"
if [ -f "$minilm/model.safetensors" ]; then
  # A one-model linear merge is the identity: it rewrites the weights in bf16.
  tmp=$(mktemp -d)
  printf 'merge_method: linear\nmodels:\n  - model: %s\n    parameters: {weight: 1.0}\n' "$minilm" >"$tmp/m.yml"
  "$CARGO_TARGET_DIR/release/symerge" merge "$tmp/m.yml" -o "$tmp/minilm" --dtype bfloat16 --device cpu -q
  tar -cJf .devbin/minilm.tar.xz -C "$tmp/minilm" model.safetensors config.json tokenizer.json
  rm -rf "$tmp"
else
  echo "warning: no MiniLM at $minilm (run scripts/fetch-assets.sh): gpu_backend's model tests will fail" >&2
fi
# The four real tasks for benches/adapt_cuda.sh (ADAPT=1): enough training lines to fine-tune
# experts briefly there, 200 test inputs each.
debian="${SYMERGE_DEBIAN:-$PWD/target/assets/debian}"
if [ -d "$debian" ]; then
  tmp=$(mktemp -d)
  "$CARGO_TARGET_DIR/release/symerge" data prepare --source "$debian" --out "$tmp/full" -q
  for t in wn-noun wn-verb fortune-topic lang-id; do
    mkdir -p "$tmp/data/$t"
    head -n 640 "$tmp/full/$t/train.jsonl" >"$tmp/data/$t/train.jsonl"
    head -n 200 "$tmp/full/$t/test.jsonl" >"$tmp/data/$t/test.jsonl"
    cp "$tmp/full/$t/labels.json" "$tmp/data/$t/"
  done
  tar -cJf .devbin/adapt-data.tar.xz -C "$tmp/data" .
  rm -rf "$tmp"
else
  echo "warning: no Debian packages at $debian (run scripts/fetch-assets.sh): ADAPT=1 will fail" >&2
fi
exes=(symerge gpu_kernels gpu_merge kernels_compile device_flag gpu_backend gpu_nccl)
(cd .devbin && tar -cJf exe.tar.xz "${exes[@]}" && rm -f "${exes[@]}")
ls -la .devbin
# What travels: the tracked tree, untracked files git does not ignore, and .devbin (carried).
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- | tail -1 | cut -f1)
devbin=$(du -cb .devbin/* | tail -1 | cut -f1)
total=$((tree + devbin))
echo "travels: $((total >> 20)) MiB (tree $((tree >> 20)) MiB, .devbin $((devbin >> 20)) MiB; the limit is 64 MiB)"
if [ "$total" -gt $((62 << 20)) ]; then
  echo "error: over 62 MiB: the device tool would refuse the run" >&2
  exit 1
fi
