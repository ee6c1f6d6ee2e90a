#!/usr/bin/env bash
# `adapt --device cuda`, end to end, on the GPU machine (scripts/gpu-check.sh runs it with ADAPT=1
# over what scripts/gpu-prepare.sh packed; nothing is compiled there):
#
#   minilm  the real MiniLM-L6 (bf16, as packed), four real tasks (200 test inputs each): experts
#           fine-tuned there (--device cuda, 20 steps: for speed, not accuracy), their labels
#           cached, then SyMerge for 500 epochs (2,000 steps, batch 32, max length 64), wall time
#           and marginal seconds per step from a 2-epoch run; the same 2 epochs on the CPU, whose
#           Lambda the GPU's must match; eager PyTorch (benches/adapt_torch.py --device cuda) on
#           the same experts and inputs in the same run.
#   llm     a generated llama-1b family (bf16 base + 3 experts, 8.8 GB): `adapt --device cuda`
#           streamed (--device-mem 0: every shared block copied to the GPU at each visit) and
#           resident, seconds per step next to the floor bytes streamed per step / pinned H2D.
#
#   BIN=... MINILM=... DATA=... OUT=... benches/adapt_cuda.sh [minilm|llm|all]
#   (MODES="streamed" runs the llm part's streamed adapt alone)
# One JSON line per result on stdout and in $OUT/adapt.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
BIN=${BIN:?the symerge binary}
OUT=${OUT:-/tmp/adapt-cuda-out}
W=$(realpath -m "${WORK:-/tmp/adapt-cuda}")
# DEVICE=cpu EPOCHS=3 rehearses the plumbing on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-500}
mkdir -p "$W" "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now() { date +%s.%N; }
emit() { python3 -c "import json, sys; print(json.dumps(json.loads(sys.argv[1])))" "$1" | tee -a "$OUT/adapt.jsonl"; }

# Seconds per step of a train_log.jsonl (benches/per_step.py).
per_step() { python3 benches/per_step.py "$1"; }

minilm() {
  local M D tasks="" t args=()
  M=$(realpath "${MINILM:?the MiniLM directory}") D=$(realpath "${DATA:?the prepared data directory}")
  for t in wn-noun wn-verb fortune-topic lang-id; do
    log "fine-tuning a $t expert (--device $DEVICE, 20 steps)"
    "$BIN" finetune "$M" --train "$D/$t/train.jsonl" --labels "$D/$t/labels.json" -o "$W/experts/$t" --steps 20 \
      --batch-size 16 --max-len 64 --seed 0 --force --device "$DEVICE" -q
    "$BIN" cache-labels --expert "$W/experts/$t" --task "$t" --inputs "$D/$t/test.jsonl" -o "$W/$t.labels" \
      --max-len 64 --device "$DEVICE" -q --force
    tasks+="  - {name: $t, expert: $W/experts/$t, inputs: $D/$t/test.jsonl, cache: $W/$t.labels}"$'\n'
    args+=(--task "$t=$W/experts/$t:$D/$t/test.jsonl")
  done
  printf 'method: symerge\nbase_model: %s\nmax_len: 64\nbatch_size: 32\nepochs: 500\ntasks:\n%s' "$M" "$tasks" \
    >"$W/minilm.yml"
  local t0 t1 t2 t3 t4 t5
  log "adapt --device $DEVICE, 2 epochs, and the same on the CPU"
  t0=$(now)
  "$BIN" adapt "$W/minilm.yml" -o "$W/mini-gpu2" --force --no-eval --epochs 2 --device "$DEVICE" --json >"$W/gpu2.json"
  t1=$(now)
  "$BIN" adapt "$W/minilm.yml" -o "$W/mini-cpu2" --force --no-eval --epochs 2 --device cpu --json >"$W/cpu2.json"
  t2=$(now)
  log "adapt --device $DEVICE, $EPOCHS epochs"
  "$BIN" adapt "$W/minilm.yml" -o "$W/mini-gpu" --force --no-eval --epochs "$EPOCHS" --device "$DEVICE" --json >"$W/gpu500.json"
  t3=$(now)
  python3 - "$W" "$EPOCHS" "$t0" "$t1" "$t2" "$t3" <<'PY' | tee -a "$OUT/adapt.jsonl"
import json, math, sys
w, epochs, (t0, t1, t2, t3) = sys.argv[1], int(sys.argv[2]), map(float, sys.argv[3:])
def lam(d):
    v = json.load(open(f"{w}/{d}/lambda.json"))
    out = []
    def walk(x):
        if isinstance(x, (int, float)) and not isinstance(x, bool): out.append(float(x))
        elif isinstance(x, list): [walk(y) for y in x]
        elif isinstance(x, dict): [walk(y) for y in x.values()]
    walk(v["lambda"])
    return out
g, c = lam("mini-gpu2"), lam("mini-cpu2")
apart = sum(abs(a - b) > 1e-3 for a, b in zip(g, c))
steps = sum(1 for _ in open(f"{w}/mini-gpu/train_log.jsonl"))
print(json.dumps({"part": "minilm", "run": "symerge-cuda", "epochs": epochs, "steps": 4 * epochs,
                  "wall_seconds": t3 - t2, "marginal_seconds_per_step": ((t3 - t2) - (t1 - t0)) / (4 * epochs - 8),
                  "two_epoch_gpu_seconds": t1 - t0, "two_epoch_cpu_seconds": t2 - t1, "log_lines": steps,
                  "lambda_cpu_vs_gpu_apart_1e-3": apart, "lambda_count": len(c),
                  "lambda_max_abs_diff": max((abs(a - b) for a, b in zip(g, c)), default=math.nan)}))
PY
  if [ "$DEVICE" = cuda ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    log "eager PyTorch, same step, on the GPU"
    python3 benches/adapt_torch.py --base "$M" "${args[@]}" --device cuda --steps 200 --warmup 8 |
      tee -a "$OUT/adapt.jsonl"
  fi
}

llm() {
  local P=${PRESET:-llama-1b} TOK=tests/fixtures/llama_gqa/tokenizer.json tasks="" k
  local F=$W/$P
  log "generating $P base + 3 experts (bf16)"
  "$BIN" generate --preset "$P" --experts 3 --delta-scale 0.01 -o "$F" -q >/dev/null
  for d in "$F"/base "$F"/expert-*; do cp "$TOK" "$d/"; done
  for k in 1 2 3; do
    printf '{"text": "task %s: the cat sat on the mat"}\n{"text": "task %s: a river flows to the sea"}\n' "$k" "$k" >"$W/t$k.jsonl"
    "$BIN" cache-labels --expert "$F/expert-$k" --task "t$k" --inputs "$W/t$k.jsonl" -o "$W/t$k.labels" \
      --max-len 16 --top-k 8 --device "$DEVICE" -q --force
    tasks+="  - {name: t$k, expert: $F/expert-$k, inputs: $W/t$k.jsonl, cache: $W/t$k.labels}"$'\n'
  done
  printf 'method: symerge\nbase_model: %s\nmax_len: 16\nbatch_size: 2\nepochs: 3\ntasks:\n%s' "$F/base" "$tasks" \
    >"$W/llm.yml"
  local mode mem
  for mode in ${MODES:-streamed resident}; do
    mem=(); [ "$mode" = streamed ] && mem=(--device-mem 0)
    log "adapt --device $DEVICE ($mode, 9 steps)"
    "$BIN" adapt "$W/llm.yml" -o "$W/llm-$mode" --force --no-eval --device "$DEVICE" "${mem[@]}" --json >"$W/llm-$mode.json"
    python3 - "$W/llm-$mode.json" "$(per_step "$W/llm-$mode/train_log.jsonl")" "$mode" "$P" <<'PY' | tee -a "$OUT/adapt.jsonl"
import json, sys
s = json.load(open(sys.argv[1]))
step = float(sys.argv[2])
per = s.get("bytes_streamed_per_step") or 0
print(json.dumps({"part": "llm", "run": sys.argv[3], "family": sys.argv[4] + " bf16 base + 3 experts",
                  "mode": s.get("streaming", {}).get("mode"), "gb_streamed_per_step": per / 1e9,
                  "seconds_per_step": step, "floor_seconds_at_55_gb_s": per / 55e9,
                  "peak_rss_gb": (s.get("peak_rss_bytes") or 0) / 1e9, "run_seconds": s.get("seconds")}))
PY
    rm -rf "$W/llm-$mode"
  done
}

case "$PART" in
  minilm) minilm ;;
  llm) llm ;;
  all) minilm; llm ;;
  *) echo "usage: $0 [minilm|llm|all]" >&2; exit 2 ;;
esac
