#!/usr/bin/env bash
# Merge-quality benchmark: one real pretrained encoder (MiniLM-L6), four real text tasks, experts
# fine-tuned by `symerge finetune`, then per-task test accuracy of: pretrained encoder with each
# task's head, each expert, linear, task_arithmetic (lambda tuned on validation), TIES (lambda
# tuned on validation), AdaMerging and SyMerge (several seeds; soft and hard_conf losses).
#
#   benches/merge_quality/run.sh              # PROFILE=cpu: small settings, about an hour on 2 cores
#   PROFILE=full benches/merge_quality/run.sh # the paper-like settings (GPU-sized)
#   PROFILE=demo / quick                       # scripts/demo.sh (and its --quick test size)
#
# Everything lands in target/quality/$PROFILE/ (or $OUT); the table is printed and written, with
# the exact commands, to target/quality/$PROFILE/quality.json (copy it to
# benches/results/quality.json). SYMERGE_BIN=PATH runs that binary instead of building one.
set -euo pipefail
# Relative to the caller's directory, before the cd below; a bare name is looked up on PATH.
if [ -n "${SYMERGE_BIN:-}" ]; then
  case "$SYMERGE_BIN" in
    */*) SYMERGE_BIN="$(cd "$(dirname "$SYMERGE_BIN")" && pwd)/$(basename "$SYMERGE_BIN")" ;;
    *) SYMERGE_BIN="$(command -v "$SYMERGE_BIN")" || { echo "SYMERGE_BIN: no $SYMERGE_BIN on PATH" >&2; exit 2; } ;;
  esac
  [ -x "$SYMERGE_BIN" ] || { echo "SYMERGE_BIN: $SYMERGE_BIN is not an executable file" >&2; exit 2; }
fi
[ -z "${OUT:-}" ] || OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-cpu}
USER_TASKS=${TASKS:-}
TASKS=${TASKS:-"wn-noun wn-verb fortune-topic lang-id"}
# TA_GRID / TIES_GRID: lambdas tried on validation; EXTRA: also run adamerging and symerge's
# hard_conf loss (the benchmark does, the demo does not).
TA_GRID="0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0"; TIES_GRID="0.2 0.4 0.6 0.8 1.0 1.2"; EXTRA=1
case "$PROFILE" in
  cpu)  FT_STEPS=${FT_STEPS:-250}; FT_BS=16; MAXLEN=64; TEST_N=400; VAL_N=200; EPOCHS=${EPOCHS:-40}; SEEDS=${SEEDS:-"0 1 2"} ;;
  full) FT_STEPS=${FT_STEPS:-3000}; FT_BS=32; MAXLEN=128; TEST_N=100000; VAL_N=1000; EPOCHS=${EPOCHS:-500}; SEEDS=${SEEDS:-"0 1 2"} ;;
  # scripts/demo.sh: three tasks, short fine-tunes, one SyMerge seed (about 10 minutes on 2 cores).
  demo) TASKS=${USER_TASKS:-"wn-verb fortune-topic lang-id"}; FT_STEPS=${FT_STEPS:-60}; FT_BS=16; MAXLEN=64; TEST_N=200
        VAL_N=100; EPOCHS=${EPOCHS:-30}; SEEDS=0; TA_GRID="0.3 0.5 0.7 1.0"; TIES_GRID="0.6 1.0"; EXTRA=0 ;;
  # `scripts/demo.sh --quick` (tests/demo.rs): every step on tiny sizes, numbers meaningless.
  quick) TASKS=${USER_TASKS:-"wn-verb lang-id"}; FT_STEPS=3; FT_BS=4; MAXLEN=32; TEST_N=8; VAL_N=4; EPOCHS=2; SEEDS=0
         TA_GRID="0.5 1.0"; TIES_GRID="1.0"; EXTRA=0 ;;
  *) echo "PROFILE must be cpu, full, demo or quick" >&2; exit 2 ;;
esac
W=${OUT:-target/quality/$PROFILE}
BIN=${SYMERGE_BIN:-target/release/symerge}
BASE=target/assets/minilm
CMDS=$W/commands.txt
mkdir -p "$W"/{sets,experts,merged,cache,adapt,scores}
WA=$(cd "$W" && pwd)   # $W as an absolute path, for the configs
: >"$CMDS"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# Runs and records a command (the benchmark's exact commands go into the results).
run() { echo "$*" >>"$CMDS"; "$@"; }
acc() { python3 -c 'import json,sys; print(round(100*json.load(sys.stdin)["accuracy"], 2))'; }

[ -n "${SYMERGE_BIN:-}" ] || cargo build --release -q
scripts/fetch-assets.sh minilm debian >/dev/null   # not the LLM or NVRTC: unused here
# Steps whose outputs exist are skipped on a rerun, but still recorded among the commands.
if [ -d "$W/data" ]; then echo "$BIN data prepare --out $W/data" >>"$CMDS"; else run $BIN data prepare --out "$W/data" >/dev/null; fi

for t in $TASKS; do
  head -n "$TEST_N" "$W/data/$t/test.jsonl" >"$W/sets/$t.test.jsonl"
  head -n "$VAL_N" "$W/data/$t/validation.jsonl" >"$W/sets/$t.val.jsonl"
  ft=($BIN finetune "$BASE" --train "$W/data/$t/train.jsonl" --labels "$W/data/$t/labels.json"
    -o "$W/experts/$t" --steps "$FT_STEPS" --batch-size "$FT_BS" --max-len "$MAXLEN" --lr 1e-4 --head-lr 1e-3 --seed 0 --force)
  if [ -f "$W/experts/$t/model.safetensors" ]; then
    echo "${ft[*]}" >>"$CMDS"
  else
    log "fine-tuning the $t expert ($FT_STEPS steps)"
    run "${ft[@]}" >/dev/null
  fi
done

# score METHOD TASK MODEL [--head-from EXPERT] -> appends "METHOD TASK ACC" to scores
score() {
  local method=$1 task=$2 model=$3; shift 3
  local a
  a=$(run $BIN eval "$model" "$@" --inputs "$W/sets/$task.test.jsonl" --max-len "$MAXLEN" --json | acc)
  echo "$method $task $a" >>"$W/scores/test.txt"
  log "$method $task: $a%"
}
val_avg() {  # MODEL -> mean validation accuracy over tasks with each task's head
  local model=$1 sum=0 a
  for t in $TASKS; do
    a=$(run $BIN eval "$model" --head-from "$W/experts/$t" --inputs "$W/sets/$t.val.jsonl" --max-len "$MAXLEN" --json | acc)
    sum=$(python3 -c "print($sum + $a)")
  done
  python3 -c "print($sum / len('$TASKS'.split()))"
}
merge_cfg() {  # METHOD LAMBDA [DENSITY] -> config text
  local method=$1 lam=$2 density=${3:-}
  echo "merge_method: $method"
  # The base names the merged tensors (the experts' heads differ, so they are left out); linear
  # merges a base_model that `models` leaves out as one more model (mergekit's rule), here at
  # weight 0, so it averages the experts only.
  echo "base_model: $PWD/$BASE"
  echo "models:"
  for t in $TASKS; do
    echo "  - model: $WA/experts/$t"
    if [ -n "$density" ]; then echo "    parameters: {weight: 1.0, density: $density}"; else echo "    parameters: {weight: 1.0}"; fi
  done
  if [ "$method" = linear ]; then echo "parameters: {weight: 0}"; else echo "parameters: {lambda: $lam}"; fi
}
do_merge() {  # NAME METHOD LAMBDA [DENSITY]
  merge_cfg "$2" "$3" "${4:-}" >"$W/merged/$1.yml"
  run $BIN merge "$W/merged/$1.yml" -o "$W/merged/$1" --force -q >/dev/null
}
tune() {  # METHOD DENSITY GRID... -> best lambda (by mean validation accuracy)
  local method=$1 density=$2; shift 2
  local best="" best_acc=-1 lam v
  for lam in "$@"; do
    do_merge "$method-$lam" "$method" "$lam" "$density"
    v=$(val_avg "$W/merged/$method-$lam")
    log "$method lambda $lam: validation mean $v%"
    echo "$method $lam $v" >>"$W/scores/validation.txt"
    if python3 -c "import sys; sys.exit(0 if $v > $best_acc else 1)"; then best=$lam; best_acc=$v; fi
  done
  echo "$best"
}

: >"$W/scores/test.txt"; : >"$W/scores/validation.txt"
for t in $TASKS; do
  score experts "$t" "$W/experts/$t"
  score pretrained "$t" "$BASE" --head-from "$W/experts/$t"
done
do_merge linear linear 1.0
for t in $TASKS; do score linear "$t" "$W/merged/linear" --head-from "$W/experts/$t"; done
ta=$(tune task_arithmetic "" $TA_GRID)
for t in $TASKS; do score task_arithmetic "$t" "$W/merged/task_arithmetic-$ta" --head-from "$W/experts/$t"; done
ties=$(tune ties 0.2 $TIES_GRID)
for t in $TASKS; do score ties "$t" "$W/merged/ties-$ties" --head-from "$W/experts/$t"; done

for t in $TASKS; do
  run $BIN cache-labels --expert "$W/experts/$t" --task "$t" --inputs "$W/sets/$t.test.jsonl" \
    -o "$W/cache/$t.labels" --max-len "$MAXLEN" >/dev/null
done
adapt_cfg() {  # METHOD LOSS
  echo "method: $1"
  echo "base_model: $PWD/$BASE"
  echo "loss: $2"
  echo "max_len: $MAXLEN"
  echo "tasks:"
  for t in $TASKS; do
    echo "  - {name: $t, expert: $WA/experts/$t, inputs: $WA/sets/$t.test.jsonl, cache: $WA/cache/$t.labels}"
  done
}
adapt() {  # NAME METHOD LOSS SEED
  adapt_cfg "$2" "$3" >"$W/adapt/$1.yml"
  log "adapt $1 ($EPOCHS epochs)"
  run $BIN adapt "$W/adapt/$1.yml" -o "$W/adapt/$1" --epochs "$EPOCHS" --seed "$4" --force --json --log-every 40 \
    >"$W/adapt/$1.json"
  python3 - "$W/adapt/$1.json" "$1" >>"$W/scores/test.txt" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
# Fractions since format_version 2 (earlier builds: percent), printed in percent like acc().
scale = 100 if s.get("format_version", 1) >= 2 else 1
for t in s["tasks"]:
    print(sys.argv[2], t["name"], round(scale * t["accuracy"], 2))
PY
}
if [ "$EXTRA" = 1 ]; then adapt adamerging adamerging soft 0; fi
for s in $SEEDS; do adapt "symerge-seed$s" symerge soft "$s"; done
if [ "$EXTRA" = 1 ]; then adapt symerge-hard_conf symerge hard_conf 0; fi

python3 - "$W" "$PROFILE" "$ta" "$ties" "$EPOCHS" "$SEEDS" <<'PY'
import json, statistics, sys, platform
W, profile, ta, ties, epochs, seeds = sys.argv[1:7]
rows = [l.split() for l in open(f"{W}/scores/test.txt")]
acc = {}
for m, t, a in rows:
    acc.setdefault(m, {})[t] = float(a)
seed_runs = [m for m in acc if m.startswith("symerge-seed")]
tasks = list(acc["experts"])
acc["symerge"] = acc[seed_runs[0]]
out = {
    "accuracy": {m: acc[m] for m in ["pretrained", "experts", "linear", "task_arithmetic", "ties", "adamerging", "symerge"] if m in acc},
    "symerge_seeds": {m: acc[m] for m in seed_runs},
    "symerge_hard_conf": acc.get("symerge-hard_conf"),
    "symerge_seed_mean_std": {
        t: [round(statistics.mean(acc[m][t] for m in seed_runs), 2), round(statistics.pstdev(acc[m][t] for m in seed_runs), 2)]
        for t in tasks
    },
    "tuned": {"task_arithmetic_lambda": float(ta), "ties_lambda": float(ties), "ties_density": 0.2},
    "profile": profile, "epochs": int(epochs),
    "commands": [l.rstrip("\n") for l in open(f"{W}/commands.txt")],
    "device": f"cpu ({platform.machine()}, {__import__('os').cpu_count()} cores)",
}
json.dump(out, open(f"{W}/quality.json", "w"), indent=1)
avg = lambda d: sum(d.values()) / len(d)
# The row labels README's demo table shows (one source: README copies this output), with the
# lambda each tuned method chose on validation.
labels = {
    "pretrained": "pretrained + each task's head",
    "task_arithmetic": f"task_arithmetic (lambda {ta}, tuned on validation)",
    "ties": f"ties (density 0.2, lambda {ties}, tuned on validation)",
    "adamerging": f"adamerging (seed 0, {epochs} epochs)",
    "symerge-hard_conf": f"symerge, loss hard_conf (seed 0, {epochs} epochs)",
}
labels.update({m: f"symerge (seed {m[len('symerge-seed'):]}, {epochs} epochs)" for m in seed_runs})
print("| method | " + " | ".join(tasks) + " | average |")
print("| --- " * (len(tasks) + 2) + "|")
for m in ["pretrained", "experts", "linear", "task_arithmetic", "ties", "adamerging"] + seed_runs + ["symerge-hard_conf"]:
    if m in acc:
        print(f"| {labels.get(m, m)} | " + " | ".join(f"{acc[m][t]:.2f}" for t in tasks) + f" | {avg(acc[m]):.2f} |")
if len(seed_runs) > 1:
    means = [statistics.mean(avg(acc[m]) for m in seed_runs), statistics.pstdev(avg(acc[m]) for m in seed_runs)]
    print(f"\nsymerge average over {len(seed_runs)} seeds: {means[0]:.2f} +- {means[1]:.2f}")
PY
