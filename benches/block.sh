#!/usr/bin/env bash
# One Llama decoder block, forward + backward in f32, side by side in one run: `symerge
# bench-block` against eager PyTorch (benches/block_torch.py, attention as matmul + softmax and
# through SDPA) with the same shape, tokens and threads. Prints one JSON line per run and the
# ratio symerge / PyTorch (matmul attention), appended to $OUT/block.jsonl.
#
#   benches/block.sh [cpu|cuda]        # SHAPE (llama-7b), BATCH, SEQ, REPS, THREADS (CPU), BIN, PYTHON
#
# CPU defaults: 1 x 128 tokens, all cores. GPU defaults: 4 x 1024 tokens (the issue's setting).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${1:-cpu}
BIN=${BIN:-target/release/symerge}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-target/block-bench}
SHAPE=${SHAPE:-llama-7b}
THREADS=${THREADS:-$(nproc)}
if [ "$DEV" = cpu ]; then
  BATCH=${BATCH:-1} SEQ=${SEQ:-128} REPS=${REPS:-5}
else
  BATCH=${BATCH:-4} SEQ=${SEQ:-1024} REPS=${REPS:-10}
fi
mkdir -p "$OUT"
ours=$("$BIN" -j "$THREADS" -q bench-block --device "$DEV" --shape "$SHAPE" --batch "$BATCH" --seq "$SEQ" \
  --repeats "$REPS" --json)
torch=$("$PYTHON" benches/block_torch.py --device "$DEV" --dtypes f32 --shape "$SHAPE" --batch "$BATCH" --seq "$SEQ" \
  --threads "$THREADS" --reps "$REPS" --out "$OUT/torch.json" >/dev/null && cat "$OUT/torch.json")
python3 - "$ours" "$torch" "$THREADS" <<'PY' | tee -a "$OUT/block.jsonl"
import json, sys
ours, torch, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
m, s = torch["block"].get("f32-matmul", {}), torch["block"].get("f32-sdpa", {})
print(json.dumps({
    "device": ours["device"], "torch_device": torch["device"], "torch": torch["torch"], "shape": ours["shape"],
    "tokens": ours["tokens"], "seq": ours["seq"], "threads": threads,
    "symerge_ms": ours["forward_backward_ms"], "symerge_forward_ms": ours["forward_ms"],
    "symerge_recycled_ms": ours["forward_backward_recycled_ms"],
    "torch_f32_matmul_ms": m.get("ms"), "torch_f32_sdpa_ms": s.get("ms"),
    "symerge_over_torch_matmul": ours["forward_backward_ms"] / m["ms"] if m else None,
    "symerge_tflops": ours["tflops"], "f32_gemm_tflops": torch["gemm_tflops"].get("f32"),
}))
PY
