#!/usr/bin/env bash
# The README's first command: what symerge is for, on real data. Builds, fetches the real
# MiniLM-L6 and the Debian text data, prepares three real tasks, fine-tunes one expert per task
# (briefly), then merges them training-free (task arithmetic and TIES, lambda chosen on
# validation) and learned (SyMerge: Lambda + each task's head against the experts' cached soft
# labels), and prints every method's test accuracy per task. About 6 minutes on 2 cores once built
# (README has the measured table); a second run reuses the fine-tuned experts and data.
#
#   scripts/demo.sh           # the demo (outputs in target/quality/demo/)
#   scripts/demo.sh --quick   # every step at toy sizes (a smoke test, numbers meaningless)
#   SYMERGE_BIN=~/bin/symerge OUT=/tmp/demo scripts/demo.sh   # that binary (no cargo build),
#                                                             # outputs in /tmp/demo
set -euo pipefail
profile=demo
[ "${1:-}" = "--quick" ] && profile=quick
start=$(date +%s)
# Not cd'ing first: run.sh reads a relative SYMERGE_BIN or OUT from the caller's directory.
PROFILE=$profile "$(dirname "$0")/../benches/merge_quality/run.sh"
W=${OUT:-$(cd "$(dirname "$0")/.." && pwd)/target/quality/$profile}
cat <<MSG

Done in $(( $(date +%s) - start )) s. Outputs in $W/:
  experts/<task>/              the fine-tuned experts (Hugging Face checkpoints)
  merged/task_arithmetic-*/    training-free merges (one per lambda tried)
  adapt/symerge-seed0/         SyMerge: lambda.json (a merge Lambda table), tasks/<task>/ adapted
                               checkpoints, train_log.jsonl, summary.json
  quality.json                 the table above with every command that made it
\`symerge eval $W/adapt/symerge-seed0 --baseline\` scores SyMerge next to the merge it started from.
Your own checkpoints: write a merge config (README "Merging") or an adapt config (README "SyMerge"),
then \`symerge merge\` / \`symerge cache-labels\` + \`symerge adapt\`; add --device cuda on a GPU.
MSG
