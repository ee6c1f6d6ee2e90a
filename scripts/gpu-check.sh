#!/usr/bin/env bash
# The GPU check, run ON the GPU machine in the repository root over the executables that
# scripts/gpu-prepare.sh left in .devbin/ (nothing is compiled there):
#   1. tests/kernels_compile.rs  NVRTC compile + ptxas resource report for sm_90
#   2. tests/gpu_kernels.rs      every kernel vs its CPU twin, lambda_grad determinism; the
#                                slerp/breadcrumbs/sce kernels byte for byte
#                                (prepared_kernels_match_cpu_bit_for_bit)
#   3. tests/gpu_backend.rs      the CUDA Backend (model ops) vs the CPU: every op forward and
#                                backward, bit-identical repeats, real MiniLM logits and gradients,
#                                adaptation steps, predict/finetune --device cuda
#      tests/gpu_merge.rs        merge --device cuda vs cpu (tiny ring, resident, errors,
#                                llama-1b base + 3 experts = 8.8 GB through the CLI; slerp,
#                                breadcrumbs(_ties), sce: prepared_methods_match_cpu_bit_for_bit)
#      tests/device_flag.rs    --device auto (on the GPU) gives exactly the CPU's output
#   4. symerge bench-cuda        copy ceilings, kernels as a fraction of device copy, streaming
#                                merge of llama-7b + 2 experts (40 GB in: the 64 GB disk also
#                                holds one 13.5 GB output at a time) vs pinned H2D and vs the CPU
# Logs go to $OUT (the device tool returns them); the summary is printed last.
# Knobs: BENCH_PRESET (llama-7b), BENCH_EXPERTS (2), BENCH_ARGS (extra flags), SKIP_BENCH=1,
# DEADLINE (seconds, default 540): later steps are skipped once it would be passed;
# STEPS (e.g. "kernels_compile gpu_backend"): run only the steps named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
BIN="$PWD/.devbin"
for exe in symerge kernels_compile gpu_kernels gpu_backend gpu_merge device_flag; do
  if [ ! -x "$BIN/$exe" ]; then
    echo "missing $BIN/$exe: run scripts/gpu-prepare.sh on the build machine and carry .devbin" >&2
    exit 2
  fi
done
start=$(date +%s)
deadline="${DEADLINE:-540}"
left() { echo $((deadline - ($(date +%s) - start))); }
status=()

# NVRTC from the CUDA toolkit or the nvidia-cuda-nvrtc wheel, whichever is there.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null); do
  if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NVRTC from $d" | tee "$OUT/env.txt"
    break
  fi
done
# cuBLAS (the model backend's products), likewise: the toolkit or the nvidia-cublas wheel.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; [print(os.path.join(p, s, "lib")) for p in nvidia.__path__ for s in ("cu13", "cublas")]' 2>/dev/null); do
  if ls "$d"/libcublas.so.13* >/dev/null 2>&1; then
    case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    echo "cuBLAS from $d" | tee -a "$OUT/env.txt"
    break
  fi
done
nvidia-smi >>"$OUT/env.txt" 2>&1
export SYMERGE_BIN="$BIN/symerge" SYMERGE_PTX_CACHE=/tmp/symerge-ptx RUST_BACKTRACE=1
export SYMERGE_GPU_TEST_DIR=/tmp
# The committed fixtures, read from this checkout (the path baked into the tests is the build machine's).
export SYMERGE_REPO="$PWD"
# The bf16 MiniLM that gpu-prepare.sh packed, for tests/gpu_backend.rs.
if [ -f "$BIN/minilm.tar.xz" ]; then
  rm -rf /tmp/symerge-minilm && mkdir -p /tmp/symerge-minilm
  tar -xJf "$BIN/minilm.tar.xz" -C /tmp/symerge-minilm 2>/dev/null ||
    python3 -m tarfile -e "$BIN/minilm.tar.xz" /tmp/symerge-minilm
  export SYMERGE_MINILM=/tmp/symerge-minilm
fi

step() { # name, timeout, command...  (stdout and stderr to $OUT/name.log)
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    return
  fi
  local l
  l=$(left)
  if [ "$l" -lt 30 ]; then
    status+=("$name: SKIPPED (out of time)")
    return
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  local t0=$(date +%s)
  if [ -n "${SPLIT:-}" ]; then
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.log"
  else
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  fi
  local rc=$?
  status+=("$name: rc=$rc in $(($(date +%s) - t0))s")
  echo "== $name rc=$rc"
  tail -n 25 "$OUT/$name.log"
}

step kernels_compile 90 "$BIN/kernels_compile" --nocapture
step gpu_kernels 200 "$BIN/gpu_kernels" --nocapture --test-threads=1
step gpu_backend 240 "$BIN/gpu_backend" --nocapture --test-threads=1
step gpu_merge 220 "$BIN/gpu_merge" --nocapture --test-threads=1
step device_flag 60 "$BIN/device_flag" --nocapture
step gpu_nccl 90 "$BIN/gpu_nccl" --nocapture --test-threads=1
if [ -z "${SKIP_BENCH:-}" ]; then
  SPLIT=1 step bench 600 "$BIN/symerge" bench-cuda --preset "${BENCH_PRESET:-llama-7b}" \
    --experts "${BENCH_EXPERTS:-2}" --dir /tmp/symerge-bench --report "$OUT/bench.json" ${BENCH_ARGS:-}
fi
rm -rf /tmp/symerge-bench
echo "== summary ($(($(date +%s) - start))s)"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
grep -h -E "test result|SKIPPED|panicked|bit-identical|differ" "$OUT"/gpu_*.log "$OUT"/kernels_compile.log "$OUT"/device_flag.log "$OUT"/gpu_nccl.log 2>/dev/null | head -40
grep -h "FAILED" "$OUT"/gpu_backend.log 2>/dev/null | head -30
cat "$OUT/bench.txt" 2>/dev/null
