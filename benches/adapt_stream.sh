#!/usr/bin/env bash
# Streamed adaptation on the CPU, two parts, each side by side with its anchor in one run:
#
#   llm     llama-1b family (bf16 base + 3 experts, 8.8 GB, generated): `adapt --host-mem 0`
#           (every shared block streamed from the mappings twice a step), seconds per step from
#           train_log.jsonl next to the floor: bytes streamed per step / the `cat` rate of the
#           same files measured in the same run; peak RSS; and the same for OLD_BIN when set.
#   minilm  real MiniLM-L6, the four real tasks, experts briefly fine-tuned (speed, not quality),
#           batch 32, max length 64: seconds per step of this binary (resident and streamed)
#           next to OLD_BIN (a build of an earlier commit, e.g. the host-f32 task-vector path)
#           and to benches/adapt_torch.py (eager PyTorch, same step) when torch is installed.
#
#   benches/adapt_stream.sh [llm|minilm|all]      # OLD_BIN=path/to/old/symerge for the anchor
#
# Work files in target/adapt-stream/ (about 25 GB for llm, removed at the end); results are
# printed as JSON lines and appended to target/adapt-stream/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
W=target/adapt-stream
BIN=target/release/symerge
TOK=tests/fixtures/llama_gqa/tokenizer.json
mkdir -p "$W"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
cargo build --release -q

# Seconds per step of a train_log.jsonl (benches/per_step.py).
per_step() { python3 benches/per_step.py "$1"; }

llm() {
  local F=$W/llama-1b
  if [ ! -f "$F/expert-3/config.json" ]; then
    log "generating llama-1b base + 3 experts (bf16)"
    $BIN generate --preset llama-1b --experts 3 --delta-scale 0.01 -o "$F" >/dev/null
  fi
  for d in "$F"/base "$F"/expert-*; do cp "$TOK" "$d/"; done
  local tasks=""
  for k in 1 2 3; do
    printf '{"text": "task %s: the cat sat on the mat"}\n{"text": "task %s: a river flows to the sea"}\n' "$k" "$k" >"$W/t$k.jsonl"
    if [ ! -f "$W/t$k.labels" ]; then
      log "caching expert-$k's top-k labels"
      $BIN cache-labels --expert "$F/expert-$k" --task "t$k" --inputs "$W/t$k.jsonl" -o "$W/t$k.labels" \
        --max-len 16 --top-k 8 >/dev/null
    fi
    tasks+="  - {name: t$k, expert: $PWD/$F/expert-$k, inputs: $PWD/$W/t$k.jsonl, cache: $PWD/$W/t$k.labels}"$'\n'
  done
  printf 'method: symerge\nbase_model: %s\nmax_len: 16\nbatch_size: 2\nepochs: 2\ntasks:\n%s' "$PWD/$F/base" "$tasks" \
    >"$W/llm.yml"
  cat "$F"/base/*.safetensors "$F"/expert-*/*.safetensors >/dev/null  # warm the page cache
  local bytes t0 t1 cat_rate
  bytes=$(cat "$F"/base/*.safetensors "$F"/expert-*/*.safetensors | wc -c)
  t0=$(date +%s.%N); cat "$F"/base/*.safetensors "$F"/expert-*/*.safetensors >/dev/null; t1=$(date +%s.%N)
  cat_rate=$(python3 -c "print($bytes / ($t1 - $t0))")
  local name bin step
  for name in this ${OLD_BIN:+old}; do
    bin=$BIN; [ "$name" = old ] && bin=$OLD_BIN
    log "adapt --host-mem 0 (6 steps), $name build"
    $bin adapt "$W/llm.yml" -o "$W/llm-out" --force --json --no-eval --device cpu --host-mem 0 >"$W/llm.json"
    step=$(per_step "$W/llm-out/train_log.jsonl")
    python3 - "$W/llm.json" "$step" "$cat_rate" "$bytes" "$name" <<'PY' | tee -a "$W/results.jsonl"
import json, sys
s = json.load(open(sys.argv[1]))
step, cat, total = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
per = s["bytes_streamed_per_step"]
print(json.dumps({
    "part": "llm", "build": sys.argv[5], "family": "llama-1b bf16 base + 3 experts", "input_gb": total / 1e9,
    "mode": s["streaming"]["mode"], "gb_streamed_per_step": per / 1e9, "seconds_per_step": step,
    "cat_gb_per_s": cat / 1e9, "floor_seconds_per_step": per / cat, "ratio_to_floor": step / (per / cat),
    "peak_rss_gb": s["peak_rss_bytes"] / 1e9, "run_seconds": s["seconds"],
}))
PY
    rm -rf "$W/llm-out"
  done
}

minilm() {
  local D=$W/data M=target/assets/minilm tasks="" t
  scripts/fetch-assets.sh >/dev/null
  [ -d "$D" ] || $BIN data prepare --out "$D" >/dev/null
  for t in wn-noun wn-verb fortune-topic lang-id; do
    head -n 200 "$D/$t/test.jsonl" >"$W/$t.test.jsonl"
    if [ ! -f "$W/experts/$t/model.safetensors" ]; then
      log "fine-tuning a $t expert (20 steps: for speed, not accuracy)"
      $BIN finetune "$M" --train "$D/$t/train.jsonl" --labels "$D/$t/labels.json" -o "$W/experts/$t" --steps 20 \
        --batch-size 16 --max-len 64 --seed 0 --force >/dev/null
    fi
    [ -f "$W/$t.labels" ] || $BIN cache-labels --expert "$W/experts/$t" --task "$t" --inputs "$W/$t.test.jsonl" \
      -o "$W/$t.labels" --max-len 64 >/dev/null
    tasks+="  - {name: $t, expert: $PWD/$W/experts/$t, inputs: $PWD/$W/$t.test.jsonl, cache: $PWD/$W/$t.labels}"$'\n'
  done
  printf 'method: symerge\nbase_model: %s\nmax_len: 64\nbatch_size: 32\nepochs: 6\ntasks:\n%s' "$PWD/$M" "$tasks" \
    >"$W/minilm.yml"
  # Marginal seconds per step from 2 and 6 epochs (load and output writing cancel out).
  marginal() {  # NAME BIN ARGS...
    local name=$1 bin=$2; shift 2
    local a b
    a=$( { /usr/bin/time -f %e "$bin" adapt "$W/minilm.yml" -o "$W/mini-$name" --force --no-eval --epochs 2 "$@" \
      >/dev/null; } 2>&1 | tail -1)
    b=$( { /usr/bin/time -f %e "$bin" adapt "$W/minilm.yml" -o "$W/mini-$name" --force --no-eval --epochs 6 "$@" \
      >/dev/null; } 2>&1 | tail -1)
    python3 -c "import json; print(json.dumps({'part': 'minilm', 'run': '$name', 'seconds_per_step': ($b - $a) / 16}))" \
      | tee -a "$W/results.jsonl"
    rm -rf "$W/mini-$name"
  }
  marginal resident "$BIN"
  marginal streamed "$BIN" --host-mem 0
  if [ -n "${OLD_BIN:-}" ]; then marginal old "$OLD_BIN"; fi
  # The eager PyTorch anchor of the same step, same experts and inputs, same thread count.
  if python3 -c "import torch, safetensors, tokenizers" 2>/dev/null; then
    local args=()
    for t in wn-noun wn-verb fortune-topic lang-id; do args+=(--task "$t=$W/experts/$t:$W/$t.test.jsonl"); done
    python3 benches/adapt_torch.py --base "$M" "${args[@]}" --threads "$(nproc)" --steps 16 | tee -a "$W/results.jsonl"
  else
    log "no torch/safetensors/tokenizers for python3: PyTorch anchor skipped (pip install torch safetensors tokenizers)"
  fi
}

case "$PART" in
  llm) llm ;;
  minilm) minilm ;;
  all) minilm; llm ;;
  *) echo "usage: $0 [llm|minilm|all]" >&2; exit 2 ;;
esac
