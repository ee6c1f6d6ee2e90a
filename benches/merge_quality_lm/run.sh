#!/usr/bin/env bash
# Merge quality on a real causal LM: SmolLM2-135M-Instruct (imported from its GGUF), one expert
# fine-tuned per language-modelling task (`data prepare --task lm`: German, Italian, Polish and
# Esperanto fortunes by default), then per-task held-out perplexity and top-1 next-token accuracy
# of: the pretrained model, each expert, linear, task_arithmetic and TIES (lambda chosen on the
# validation texts' mean loss), AdaMerging (Lambda alone, each task's head frozen at its expert's,
# minimising the next-token entropy; Lambda's learning rate SyMerge's 1e-2, since these runs are
# ~50 steps where AdaMerging's 1e-3 moves Lambda by at most 0.05), and SyMerge (adapted lm_head
# over several seeds, and last_block), both trained on the unlabelled test texts, SyMerge against
# the experts' cached top-k next tokens.
#
#   benches/merge_quality_lm/run.sh               # PROFILE=cpu: small settings, ~1 hour on 2 cores
#   PROFILE=full benches/merge_quality_lm/run.sh  # larger settings (GPU-sized)
#   PROFILE=quick ...                             # every step on tiny sizes (numbers meaningless)
#
# Everything lands in target/quality-lm/$PROFILE/ (a rerun skips experts, caches and adaptations
# that exist); the table is printed and written, with the exact commands, to
# target/quality-lm/$PROFILE/quality_lm.json (copy it to benches/results/quality_lm.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-cpu}
TASKS=${TASKS:-"lm-de lm-it lm-pl lm-eo"}
TA_GRID="0.1 0.2 0.4 0.6 0.8 1.0"; TIES_GRID="0.4 0.8 1.2"; TOPK=64; LAST_BLOCK=1
case "$PROFILE" in
  cpu)   FT_STEPS=${FT_STEPS:-40}; FT_BS=8; FT_LR=2e-4; MAXLEN=64; TEST_N=64; VAL_N=32; EPOCHS=${EPOCHS:-12}
         AD_BS=16; SEEDS=${SEEDS:-"0 1"} ;;
  full)  FT_STEPS=${FT_STEPS:-1000}; FT_BS=16; FT_LR=1e-4; MAXLEN=128; TEST_N=400; VAL_N=200; EPOCHS=${EPOCHS:-300}
         AD_BS=32; SEEDS=${SEEDS:-"0 1 2"} ;;
  quick) TASKS=${TASKS_QUICK:-"lm-de lm-eo"}; FT_STEPS=2; FT_BS=2; FT_LR=1e-4; MAXLEN=24; TEST_N=4; VAL_N=3; EPOCHS=1
         AD_BS=2; SEEDS=0; TA_GRID="0.5 1.0"; TIES_GRID="1.0"; TOPK=8; LAST_BLOCK=0 ;;
  *) echo "PROFILE must be cpu, full or quick" >&2; exit 2 ;;
esac
W=target/quality-lm/$PROFILE
BIN=${BIN:-target/release/symerge}  # a copy keeps a long run on one build while the tree changes
BASE=$W/smollm2
CMDS=$W/commands.txt
mkdir -p "$W"/{sets,experts,merged,cache,adapt,scores}
: >"$CMDS"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
run() { echo "$*" >>"$CMDS"; "$@"; }
# skip_or_run OUTPUT CMD...: records the command; runs it unless OUTPUT exists.
skip_or_run() { local out=$1; shift; if [ -e "$out" ]; then echo "$*" >>"$CMDS"; else run "$@" >/dev/null; fi; }

cargo build --release -q
scripts/fetch-assets.sh >/dev/null
skip_or_run "$BASE/model.safetensors" $BIN import-gguf target/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o "$BASE" -q
skip_or_run "$W/data/lm-de" $BIN data prepare --out "$W/data" --task lm -q

for t in $TASKS; do
  head -n "$TEST_N" "$W/data/$t/test.jsonl" >"$W/sets/$t.test.jsonl"
  head -n "$VAL_N" "$W/data/$t/validation.jsonl" >"$W/sets/$t.val.jsonl"
  [ -e "$W/experts/$t/model.safetensors" ] || log "fine-tuning the $t expert ($FT_STEPS steps of $FT_BS texts)"
  skip_or_run "$W/experts/$t/model.safetensors" $BIN finetune "$BASE" --train "$W/data/$t/train.jsonl" \
    -o "$W/experts/$t" --steps "$FT_STEPS" --batch-size "$FT_BS" --max-len "$MAXLEN" --lr "$FT_LR" --seed 0 --force -q
done

# lm_eval MODEL SET -> "loss ppl top1" on one JSONL of texts
lm_eval() {
  run $BIN eval "$1" --inputs "$2" --max-len "$MAXLEN" --json -q |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["mean_loss"], r["perplexity"], r["top1_accuracy"])'
}
score() {  # METHOD TASK MODEL -> appends "METHOD TASK loss ppl top1" to scores/test.txt
  local r
  r=$(lm_eval "$3" "$W/sets/$2.test.jsonl")
  echo "$1 $2 $r" >>"$W/scores/test.txt"
  log "$1 $2: loss ppl top1 = $r"
}
val_loss() {  # MODEL -> mean validation loss over the tasks
  local sum=0 r
  for t in $TASKS; do
    r=$(lm_eval "$1" "$W/sets/$t.val.jsonl")
    sum=$(python3 -c "print($sum + ${r%% *})")
  done
  python3 -c "print($sum / len('$TASKS'.split()))"
}
merge_cfg() {  # METHOD LAMBDA [DENSITY]
  local method=$1 lam=$2 density=${3:-}
  echo "merge_method: $method"
  echo "base_model: $PWD/$BASE"
  echo "models:"
  for t in $TASKS; do
    echo "  - model: $PWD/$W/experts/$t"
    if [ -n "$density" ]; then echo "    parameters: {weight: 1.0, density: $density}"; else echo "    parameters: {weight: 1.0}"; fi
  done
  [ "$method" = linear ] || echo "parameters: {lambda: $lam}"
}
do_merge() {  # NAME METHOD LAMBDA [DENSITY]
  merge_cfg "$2" "$3" "${4:-}" >"$W/merged/$1.yml"
  run $BIN merge "$W/merged/$1.yml" -o "$W/merged/$1" --force -q >/dev/null
}
tune() {  # METHOD DENSITY GRID... -> the lambda with the lowest mean validation loss
  local method=$1 density=$2; shift 2
  local best="" best_loss=inf lam v
  for lam in "$@"; do
    do_merge "$method-$lam" "$method" "$lam" "$density"
    v=$(val_loss "$W/merged/$method-$lam")
    log "$method lambda $lam: mean validation loss $v"
    echo "$method $lam $v" >>"$W/scores/validation.txt"
    if python3 -c "import sys; sys.exit(0 if $v < float('$best_loss') else 1)"; then best=$lam; best_loss=$v; fi
    [ "$lam" = "$best" ] || rm -rf "$W/merged/$method-$lam"
  done
  echo "$best"
}

: >"$W/scores/test.txt"; : >"$W/scores/validation.txt"
for t in $TASKS; do
  score experts "$t" "$W/experts/$t"
  score pretrained "$t" "$BASE"
done
do_merge linear linear 1.0
for t in $TASKS; do score linear "$t" "$W/merged/linear"; done
ta=$(tune task_arithmetic "" $TA_GRID)
for t in $TASKS; do score task_arithmetic "$t" "$W/merged/task_arithmetic-$ta"; done
ties=$(tune ties 0.2 $TIES_GRID)
for t in $TASKS; do score ties "$t" "$W/merged/ties-$ties"; done

for t in $TASKS; do
  skip_or_run "$W/cache/$t.labels" $BIN cache-labels --expert "$W/experts/$t" --task "$t" \
    --inputs "$W/sets/$t.test.jsonl" -o "$W/cache/$t.labels" --max-len "$MAXLEN" --top-k "$TOPK" -q
done
adapt() {  # NAME LAYER SEED [METHOD [EPOCHS]]
  local name=$1 method=${4:-symerge} epochs=${5:-$EPOCHS}
  {
    echo "method: $method"
    echo "base_model: $PWD/$BASE"
    echo "adapted_layer: $2"
    echo "max_len: $MAXLEN"
    echo "batch_size: $AD_BS"
    [ "$method" = symerge ] || echo "lambda_lr: 1e-2"
    echo "tasks:"
    for t in $TASKS; do
      if [ "$method" = symerge ]; then cache=", cache: $PWD/$W/cache/$t.labels"; else cache=""; fi
      echo "  - {name: $t, expert: $PWD/$W/experts/$t, inputs: $PWD/$W/sets/$t.test.jsonl$cache}"
    done
  } >"$W/adapt/$name.yml"
  [ -e "$W/adapt/$name/summary.json" ] || log "adapt $name ($epochs epochs)"
  skip_or_run "$W/adapt/$name/summary.json" $BIN adapt "$W/adapt/$name.yml" -o "$W/adapt/$name" --epochs "$epochs" \
    --seed "$3" --no-eval --force -q
  for t in $TASKS; do score "$name" "$t" "$W/adapt/$name/tasks/$t"; done
}
# Ablation: each expert's own head with Lambda left at its initial 0.3 (no training): how much of
# SyMerge's gain the per-task head alone gives.
adapt heads-untrained head 0 symerge 0
adapt adamerging head 0 adamerging
for s in $SEEDS; do adapt "symerge-seed$s" head "$s"; done
if [ "$LAST_BLOCK" = 1 ]; then adapt symerge-last_block last_block 0; fi

python3 - "$W" "$PROFILE" "$ta" "$ties" "$EPOCHS" <<'PY'
import json, math, os, platform, statistics, sys
W, profile, ta, ties, epochs = sys.argv[1:6]
ppl, top1 = {}, {}
for line in open(f"{W}/scores/test.txt"):
    m, t, loss, p, a = line.split()
    ppl.setdefault(m, {})[t] = round(float(p), 3)
    top1.setdefault(m, {})[t] = round(100 * float(a), 2)
seeds = [m for m in ppl if m.startswith("symerge-seed")]
tasks = list(ppl["experts"])
for d in (ppl, top1):
    d["symerge"] = d[seeds[0]]
order = ["pretrained", "experts", "linear", "task_arithmetic", "ties", "adamerging", "symerge"]
gmean = lambda d: math.exp(sum(math.log(v) for v in d.values()) / len(d))
out = {
    "metric": "perplexity",
    "values": {m: ppl[m] for m in order},
    "top1_accuracy": {m: top1[m] for m in order},
    "symerge_seeds": {m: ppl[m] for m in seeds},
    "symerge_last_block": ppl.get("symerge-last_block"),
    "ablation_expert_heads_untrained_lambda": ppl.get("heads-untrained"),
    "symerge_last_block_top1": top1.get("symerge-last_block"),
    "tuned": {"task_arithmetic_lambda": float(ta), "ties_lambda": float(ties), "ties_density": 0.2},
    "profile": profile, "epochs": int(epochs),
    "commands": [l.rstrip("\n") for l in open(f"{W}/commands.txt")],
    "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
}
json.dump(out, open(f"{W}/quality_lm.json", "w"), indent=1)
rows = [m for m in order if m != "symerge"] + seeds + [m for m in ("symerge-last_block", "heads-untrained") if m in ppl]
print("perplexity (lower is better; average = geometric mean) / top-1 next-token accuracy %")
print("| method | " + " | ".join(tasks) + " | average |")
print("| --- " * (len(tasks) + 2) + "|")
for m in rows:
    cells = " | ".join(f"{ppl[m][t]:.2f} / {top1[m][t]:.1f}" for t in tasks)
    print(f"| {m} | {cells} | {gmean(ppl[m]):.2f} / {statistics.mean(top1[m].values()):.1f} |")
if len(seeds) > 1:
    avgs = [gmean(ppl[m]) for m in seeds]
    print(f"\nsymerge (head) over {len(seeds)} seeds: perplexity {statistics.mean(avgs):.2f} +- {statistics.pstdev(avgs):.2f}")
PY
