#!/usr/bin/env bash
# symerge merge vs mergekit 0.1.5 on the same files, one run, same thread count, page cache warm:
# wall time and input GB/s per method, on the generated llama-1b family (bf16 base + 3 experts,
# 8.8 GB; slerp merges the base with expert-1).
#
#   benches/vs_mergekit.sh [METHOD...]      # default: task_arithmetic ties slerp della
#
# mergekit comes from its own virtual environment (VENV, default target/venv-mergekit, created
# with --system-site-packages so torch is reused); without pip access it says so and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${*:-"task_arithmetic ties slerp della"}
W=target/vs-mergekit
F=${FAMILY:-target/adapt-stream/llama-1b}
VENV=${VENV:-target/venv-mergekit}
BIN=target/release/symerge
THREADS=$(nproc)
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$W"
cargo build --release -q
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
  log "installing mergekit 0.1.5 into $VENV"
  { python3 -m venv --system-site-packages "$VENV" && "$VENV/bin/pip" install -q mergekit==0.1.5; } ||
    { log "mergekit could not be installed: skipped"; exit 0; }
fi
if [ ! -f "$F/expert-3/config.json" ]; then
  $BIN generate --preset llama-1b --experts 3 -o "$F" -q >/dev/null
fi
cat "$F"/*/*.safetensors >/dev/null  # page cache warm
config() {  # METHOD -> mergekit YAML (which symerge reads unchanged)
  local P=$PWD/$F
  case $1 in
    slerp) printf 'merge_method: slerp\nbase_model: %s/base\nmodels:\n  - model: %s/base\n  - model: %s/expert-1\nparameters: {t: 0.5}\ndtype: bfloat16\n' "$P" "$P" "$P" ;;
    *) printf 'merge_method: %s\nbase_model: %s/base\nmodels:\n' "$1" "$P"
       for k in 1 2 3; do printf '  - model: %s/expert-%s\n    parameters: {weight: 1.0%s}\n' "$P" "$k" \
         "$( [ "$1" = ties ] || [ "$1" = della ] && echo ', density: 0.5' )"; done
       [ "$1" = della ] && printf 'parameters: {epsilon: 0.1, lambda: 1.0}\n'
       printf 'dtype: bfloat16\n' ;;
  esac
}
input_gb() { python3 -c "import os,sys; print(sum(os.path.getsize(os.path.join(d,f)) for d in sys.argv[1:] for f in os.listdir(d) if f.endswith('.safetensors'))/1e9)" "$@"; }
for m in $METHODS; do
  config "$m" >"$W/$m.yml"
  if [ "$m" = slerp ]; then gb=$(input_gb "$F/base" "$F/expert-1"); else gb=$(input_gb "$F"/base "$F"/expert-*); fi
  rm -rf "$W/out-symerge" "$W/out-mergekit"
  log "$m: symerge"
  /usr/bin/time -f %e -o "$W/time" $BIN merge "$W/$m.yml" -o "$W/out-symerge" --device cpu --threads "$THREADS" -q
  s=$(tail -1 "$W/time")
  rm -rf "$W/out-symerge"
  log "$m: mergekit (log in $W/$m.mergekit.log)"
  OMP_NUM_THREADS=$THREADS /usr/bin/time -f %e -o "$W/time" "$VENV/bin/mergekit-yaml" "$W/$m.yml" "$W/out-mergekit" \
    --lazy-unpickle --out-shard-size 5B >"$W/$m.mergekit.log" 2>&1
  k=$(tail -1 "$W/time")
  rm -rf "$W/out-mergekit"
  python3 -c "import json; s,k,g=$s,$k,$gb; print(json.dumps({'method':'$m','input_gb':round(g,3),'symerge_s':s,'mergekit_s':k,'symerge_gb_per_s':round(g/s,3),'mergekit_gb_per_s':round(g/k,3),'speedup':round(k/s,2),'threads':$THREADS}))" |
    tee -a "$W/results.jsonl"
done
