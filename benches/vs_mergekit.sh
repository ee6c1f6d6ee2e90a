#!/usr/bin/env bash
# symerge merge vs mergekit 0.1.5 on the same files, one run, same thread count, page cache warm:
# wall time and input GB/s per method, on the generated llama-1b family (bf16 base + 3 experts,
# 8.8 GB; slerp, nearswap and arcee_fusion merge the base with expert-1; nuslerp merges
# expert-1 and expert-2; linear, multislerp and karcher average the three experts without the
# base; passthrough stacks expert-1's first three quarters of the layers on expert-2's last
# three quarters, a slices frankenmerge, and counts its output's bytes as its input).
#
#   benches/vs_mergekit.sh [METHOD...]      # default: task_arithmetic ties slerp della
#
# Methods: every one both tools have (all of mergekit 0.1.5's registry): linear
# task_arithmetic ties dare_ties dare_linear breadcrumbs breadcrumbs_ties della della_linear sce
# model_stock slerp nuslerp multislerp karcher nearswap arcee_fusion ram ramplus_tl passthrough
# (METHODS="..." works as well as arguments). Parameters are mergekit's documented typical ones.
#
# mergekit comes from its own virtual environment (VENV, default target/venv-mergekit, created
# with --system-site-packages so torch is reused); without pip access it says so and stops.
# FAMILY points at an existing family (relative or absolute) instead of generating one.
# OLD_BIN=path/to/symerge also times another symerge build on the same YAML, in the same run
# (old vs new after a change); its seconds go into the line as symerge_old_s.
# Each line has wall seconds (_s) and CPU seconds, user + system (_cpu_s): on a shared machine
# the CPU seconds say more about the work done.
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${*:-${METHODS:-"task_arithmetic ties slerp della"}}
W=target/vs-mergekit
F=${FAMILY:-target/adapt-stream/llama-1b}
VENV=${VENV:-target/venv-mergekit}
BIN=target/release/symerge
OLD_BIN=${OLD_BIN:-}
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
model_params() {  # METHOD -> the per-model parameters of each expert
  case $1 in
    ties|della|della_linear|dare_ties|dare_linear) echo 'weight: 1.0, density: 0.5' ;;
    breadcrumbs|breadcrumbs_ties) echo 'weight: 1.0, density: 0.5, gamma: 0.01' ;;
    model_stock|sce|karcher|ram|ramplus_tl) echo '' ;;
    *) echo 'weight: 1.0' ;;
  esac
}
global_params() {  # METHOD -> its global parameters, if any
  case $1 in
    della|della_linear) echo 'epsilon: 0.1, lambda: 1.0' ;;
    sce) echo 'select_topk: 0.5' ;;
    karcher) echo 'max_iter: 10, tol: 1.0e-5' ;;
    ram) echo 'epsilon: 1.0e-5' ;;
    ramplus_tl) echo 'epsilon: 1.0e-5, r: 0.1, alpha: 0.2' ;;
  esac
}
experts_only() {  # METHOD MODEL_PARAMS GLOBAL_PARAMS -> YAML merging the three experts, no base
  local k
  printf 'merge_method: %s\nmodels:\n' "$1"
  for k in 1 2 3; do
    printf '  - model: %s/expert-%s\n' "$P" "$k"
    if [ -n "$2" ]; then printf '    parameters: {%s}\n' "$2"; fi
  done
  if [ -n "$3" ]; then printf 'parameters: {%s}\n' "$3"; fi
  printf 'dtype: bfloat16\n'
}
frankenmerge() {  # -> passthrough slices: expert-1's layers [0, 3L/4) then expert-2's [L/4, L)
  local L
  L=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$P/base/config.json")
  printf 'merge_method: passthrough\nslices:\n'
  printf '  - sources:\n      - model: %s/expert-1\n        layer_range: [0, %s]\n' "$P" $((L * 3 / 4))
  printf '  - sources:\n      - model: %s/expert-2\n        layer_range: [%s, %s]\n' "$P" $((L / 4)) "$L"
  printf 'dtype: bfloat16\n'
}
config() {  # METHOD -> mergekit YAML (which symerge reads unchanged)
  local P
  P=$(cd "$F" && pwd)
  case $1 in
    slerp) printf 'merge_method: slerp\nbase_model: %s/base\nmodels:\n  - model: %s/base\n  - model: %s/expert-1\nparameters: {t: 0.5}\ndtype: bfloat16\n' "$P" "$P" "$P" ;;
    nearswap) printf 'merge_method: nearswap\nbase_model: %s/base\nmodels:\n  - model: %s/base\n  - model: %s/expert-1\nparameters: {t: 0.0001}\ndtype: bfloat16\n' "$P" "$P" "$P" ;;
    arcee_fusion) printf 'merge_method: arcee_fusion\nbase_model: %s/base\nmodels:\n  - model: %s/base\n  - model: %s/expert-1\ndtype: bfloat16\n' "$P" "$P" "$P" ;;
    linear|multislerp) experts_only "$1" 'weight: 1.0' '' ;;
    karcher) experts_only "$1" '' "$(global_params "$1")" ;;
    passthrough) frankenmerge ;;
    nuslerp) printf 'merge_method: nuslerp\nmodels:\n  - model: %s/expert-1\n    parameters: {weight: 0.5}\n  - model: %s/expert-2\n    parameters: {weight: 0.5}\ndtype: bfloat16\n' "$P" "$P" ;;
    *) printf 'merge_method: %s\nbase_model: %s/base\nmodels:\n' "$1" "$P"
       local mp gp
       mp=$(model_params "$1")
       gp=$(global_params "$1")
       for k in 1 2 3; do
         printf '  - model: %s/expert-%s\n' "$P" "$k"
         if [ -n "$mp" ]; then printf '    parameters: {%s}\n' "$mp"; fi
       done
       if [ -n "$gp" ]; then printf 'parameters: {%s}\n' "$gp"; fi
       printf 'dtype: bfloat16\n' ;;
  esac
}
timed() {  # OUT_FILE COMMAND... -> runs it; "wall cpu" seconds into OUT_FILE
  /usr/bin/time -f '%e %U %S' -o "$W/time" "${@:2}"
  tail -1 "$W/time" | awk '{printf "%s %.2f\n", $1, $2 + $3}' >"$1"
}
input_gb() { python3 -c "import os,sys; print(sum(os.path.getsize(os.path.join(d,f)) for d in sys.argv[1:] for f in os.listdir(d) if f.endswith('.safetensors'))/1e9)" "$@"; }
for m in $METHODS; do
  config "$m" >"$W/$m.yml"
  case $m in
    slerp|nearswap|arcee_fusion) gb=$(input_gb "$F/base" "$F/expert-1") ;;
    nuslerp) gb=$(input_gb "$F/expert-1" "$F/expert-2") ;;
    linear|multislerp|karcher) gb=$(input_gb "$F"/expert-*) ;;
    passthrough) gb=0 ;;  # the output's size, below
    *) gb=$(input_gb "$F"/base "$F"/expert-*) ;;
  esac
  rm -rf "$W/out-symerge" "$W/out-mergekit"
  # An untimed run first: on a VM the first output written after a while pays for fresh
  # page-cache pages (seen: 6 s instead of 4 for task arithmetic), which would fall on whichever
  # tool ran first; after it every timed run writes into pages the last deletion freed.
  log "$m: symerge (warm-up, untimed)"
  $BIN merge "$W/$m.yml" -o "$W/out-symerge" --device cpu --threads "$THREADS" -q
  rm -rf "$W/out-symerge"
  log "$m: symerge"
  timed "$W/t-new" $BIN merge "$W/$m.yml" -o "$W/out-symerge" --device cpu --threads "$THREADS" -q
  if [ "$m" = passthrough ]; then gb=$(input_gb "$W/out-symerge"); fi
  rm -rf "$W/out-symerge"
  echo "0 0" >"$W/t-old"
  if [ -n "$OLD_BIN" ]; then
    log "$m: symerge $OLD_BIN"
    timed "$W/t-old" "$OLD_BIN" merge "$W/$m.yml" -o "$W/out-symerge" --device cpu --threads "$THREADS" -q
    rm -rf "$W/out-symerge"
  fi
  log "$m: mergekit (log in $W/$m.mergekit.log)"
  OMP_NUM_THREADS=$THREADS timed "$W/t-mk" "$VENV/bin/mergekit-yaml" "$W/$m.yml" "$W/out-mergekit" \
    --lazy-unpickle --out-shard-size 5B >"$W/$m.mergekit.log" 2>&1
  rm -rf "$W/out-mergekit"
  read -r s sc <"$W/t-new"
  read -r o oc <"$W/t-old"
  read -r k kc <"$W/t-mk"
  python3 -c "import json
s,sc,o,oc,k,kc,g=$s,$sc,$o,$oc,$k,$kc,$gb
q=lambda a,b,n: round(a/b,n) if b else None  # a tiny family can take 0.00 s
r={'method':'$m','input_gb':round(g,3),'symerge_s':s,'mergekit_s':k,'symerge_gb_per_s':q(g,s,3),
   'mergekit_gb_per_s':q(g,k,3),'speedup':q(k,s,2),'threads':$THREADS,'symerge_cpu_s':sc,'mergekit_cpu_s':kc}
if o: r.update(symerge_old_s=o, symerge_old_cpu_s=oc, speedup_vs_old=q(o,s,2))
print(json.dumps(r))" | tee -a "$W/results.jsonl"
done
