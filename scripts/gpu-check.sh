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
#      tests/gpu_nccl.rs         one-rank NCCL communicator, dist-check --backend nccl
#   4. benches/adapt_cuda.sh     only with ADAPT=1: adapt --device cuda end to end on MiniLM and
#                                four real tasks (2,000 steps; == the CPU's Lambda; PyTorch
#                                anchor) and on a generated llama-1b family, streamed and resident
#   5. benches/block.sh cuda     only with BLOCK=1: a Llama-7B block forward + backward (f32,
#                                4 x 1024 tokens) on our backend and in eager PyTorch, one run
#   6. symerge bench-cuda        only with BENCH=1 (a second run): copy ceilings, kernels as a
#                                fraction of device copy, streaming merge of llama-7b + 2 experts
#                                (40 GB in, one 13.5 GB output: --skip-cpu by default, since the
#                                64 GB disk cannot hold the CPU's output beside the GPU's)
# A test that would print SKIPPED fails here instead (SYMERGE_REQUIRE_GPU): a GPU the programs
# cannot use is not a green run. Logs go to $OUT as logs.tgz (the device tool returns at most 8
# files) beside summary.txt and env.txt; the summary is printed last.
# Knobs: ADAPT=1, BLOCK=1, BENCH=1, BENCH_PRESET (llama-7b), BENCH_EXPERTS (2), BENCH_ARGS (default --skip-cpu; "" for none),
# DEADLINE (seconds, default 390): later steps are skipped once it would be passed;
# STEPS (e.g. "kernels_compile gpu_backend"): run only the steps named; DRY=1 rehearses the
# script on a machine without a GPU (the tests then skip instead of failing).
# Run it as: bash scripts/gpu-check.sh, carrying .devbin (timeout_s about DEADLINE + 30).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
DEVBIN="$PWD/.devbin"
BIN=/tmp/symerge-bin
rm -rf "$BIN" && mkdir -p "$BIN"
if ! tar -xJf "$DEVBIN/exe.tar.xz" -C "$BIN" 2>/dev/null && ! python3 -m tarfile -e "$DEVBIN/exe.tar.xz" "$BIN" 2>/dev/null; then
  echo "cannot unpack $DEVBIN/exe.tar.xz: run scripts/gpu-prepare.sh on the build machine and carry .devbin" >&2
  exit 2
fi
chmod +x "$BIN"/*
for exe in symerge kernels_compile gpu_kernels gpu_backend gpu_merge device_flag gpu_nccl; do
  if [ ! -x "$BIN/$exe" ]; then
    echo "missing $exe in $DEVBIN/exe.tar.xz: run scripts/gpu-prepare.sh again" >&2
    exit 2
  fi
done
start=$(date +%s)
deadline="${DEADLINE:-390}"
left() { echo $((deadline - ($(date +%s) - start))); }
status=()
failed=0

export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
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
# NCCL: the nvidia-nccl wheel (and the libnccl2 package) ship only libnccl.so.2, a name cudarc
# does not try; a link named libnccl.so on the loader path lets it load.
for d in $(python3 -c 'import nvidia, os; [print(os.path.join(p, "nccl", "lib")) for p in nvidia.__path__]' 2>/dev/null) \
  /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
  if [ -f "$d/libnccl.so.2" ]; then
    mkdir -p /tmp/symerge-lib && ln -sf "$d/libnccl.so.2" /tmp/symerge-lib/libnccl.so
    export LD_LIBRARY_PATH="/tmp/symerge-lib:$d:$LD_LIBRARY_PATH"
    echo "NCCL from $d" | tee -a "$OUT/env.txt"
    break
  fi
done
[ -d /usr/local/nvidia/lib64 ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$OUT/env.txt"
df -h / /tmp >>"$OUT/env.txt" 2>&1
if ! nvidia-smi >>"$OUT/env.txt" 2>&1 && [ -z "${DRY:-}" ]; then
  echo "nvidia-smi failed: no usable GPU here" | tee -a "$OUT/env.txt"
  exit 3
fi
# NVRTC 13's PTX needs a CUDA 13 driver (R580 or later) to load: stop before spending the time.
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "driver ${driver:-unknown}" | tee -a "$OUT/env.txt"
if [ -z "${DRY:-}" ] && [ "${driver%%.*}" -lt 580 ] 2>/dev/null; then
  echo "driver $driver is older than R580 (CUDA 13): the kernels' PTX would not load" | tee -a "$OUT/env.txt"
  exit 4
fi
export SYMERGE_BIN="$BIN/symerge" SYMERGE_PTX_CACHE=/tmp/symerge-ptx RUST_BACKTRACE=1
[ -z "${DRY:-}" ] && export SYMERGE_REQUIRE_GPU=1
# The tests' scratch (llama-1b inputs: 8.8 GB), emptied after each step: a step killed by its
# timeout leaves its temporary directories behind.
export SYMERGE_GPU_TEST_DIR=/tmp/symerge-gpu-test
# The committed fixtures, read from this checkout (the path baked into the tests is the build machine's).
export SYMERGE_REPO="$PWD"
# The bf16 MiniLM that gpu-prepare.sh packed, for tests/gpu_backend.rs.
if [ -f "$DEVBIN/minilm.tar.xz" ]; then
  rm -rf /tmp/symerge-minilm && mkdir -p /tmp/symerge-minilm
  tar -xJf "$DEVBIN/minilm.tar.xz" -C /tmp/symerge-minilm 2>/dev/null ||
    python3 -m tarfile -e "$DEVBIN/minilm.tar.xz" /tmp/symerge-minilm
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
  [ "$rc" -ne 0 ] && failed=1
  rm -rf "$SYMERGE_GPU_TEST_DIR" && mkdir -p "$SYMERGE_GPU_TEST_DIR"
  status+=("$name: rc=$rc in $(($(date +%s) - t0))s")
  echo "== $name rc=$rc"
  tail -n 25 "$OUT/$name.log"
}

mkdir -p "$SYMERGE_GPU_TEST_DIR"
step kernels_compile 60 "$BIN/kernels_compile" --nocapture
step gpu_kernels 90 "$BIN/gpu_kernels" --nocapture --test-threads=1
step gpu_backend 150 "$BIN/gpu_backend" --nocapture --test-threads=1
step gpu_merge 150 "$BIN/gpu_merge" --nocapture --test-threads=1
step device_flag 45 "$BIN/device_flag" --nocapture
step gpu_nccl 60 "$BIN/gpu_nccl" --nocapture --test-threads=1
if [ -n "${ADAPT:-}" ]; then
  # adapt --device cuda end to end (benches/adapt_cuda.sh) over the data gpu-prepare.sh packed.
  rm -rf /tmp/symerge-adapt-data && mkdir -p /tmp/symerge-adapt-data
  tar -xJf "$DEVBIN/adapt-data.tar.xz" -C /tmp/symerge-adapt-data 2>/dev/null ||
    python3 -m tarfile -e "$DEVBIN/adapt-data.tar.xz" /tmp/symerge-adapt-data
  for part in minilm llm; do
    step "adapt_$part" 240 env BIN="$BIN/symerge" MINILM="${SYMERGE_MINILM:-}" DATA=/tmp/symerge-adapt-data \
      OUT="$OUT" WORK=/tmp/symerge-adapt bash benches/adapt_cuda.sh "$part"
    rm -rf /tmp/symerge-adapt
  done
fi
if [ -n "${BLOCK:-}" ]; then
  # One Llama-7B block forward + backward in f32: our CUDA backend against eager PyTorch.
  step block 180 env BIN="$BIN/symerge" OUT="$OUT" bash benches/block.sh cuda
fi
if [ -n "${BENCH:-}" ]; then
  SPLIT=1 step bench 540 "$BIN/symerge" bench-cuda --preset "${BENCH_PRESET:-llama-7b}" \
    --experts "${BENCH_EXPERTS:-2}" --dir /tmp/symerge-bench --report "$OUT/bench.json" ${BENCH_ARGS---skip-cpu}
fi
rm -rf /tmp/symerge-bench "$SYMERGE_GPU_TEST_DIR"
echo "== summary ($(($(date +%s) - start))s)"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
logs=$(cd "$OUT" && ls ./*.log ./*.txt 2>/dev/null | grep -v -e summary.txt -e env.txt)
grep -h -E "test result|SKIPPED|panicked|bit-identical|differ" "$OUT"/*.log 2>/dev/null | head -40
grep -h "FAILED" "$OUT"/*.log 2>/dev/null | head -30
cat "$OUT/bench.txt" "$OUT/adapt.jsonl" "$OUT/block.jsonl" 2>/dev/null
# At most 8 files come back: the step logs travel as one archive.
if [ -n "$logs" ]; then
  (cd "$OUT" && tar -czf logs.tgz $logs && rm -f $logs)
fi
exit "$failed"
