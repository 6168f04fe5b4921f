#!/usr/bin/env bash
# The GPU benchmarks in one go (< 10 minutes on one H100, every limit together 570 s): step eager/optimised, sync,
# sampling (eager and from CUDA graphs), many clients on one GPU (K = 1, 10, 100: device memory, one swap vs a
# local epoch), then the compiled step, least needed, last. bench_vs_flower is a CPU job (2 clients, 1 thread
# each) and is not run here.
# JSON and a log go to $OUT (default runs/bench, git-ignored). Run from anywhere:  bash benchmarks/run_gpu.sh
# diffusers is compared when installed (pip install -e '.[bench]'); sync uses NCCL with >= 2 GPUs, else
# 2 gloo ranks on CPU plus the Averager's on-GPU pack/unpack cost.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-runs/bench}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
status=0
run() {  # run SECONDS NAME ARGS...: one benchmark under a time limit; a failure does not stop the others
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/run_gpu.log"
  timeout "$limit" "$py" -m "$@" --json "$out/$name.json" 2>&1 | tee -a "$out/run_gpu.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name exited $rc" | tee -a "$out/run_gpu.log"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/run_gpu.log"
run 130 step_gpu benchmarks.bench_step --device cuda
run 50 sync_gpu benchmarks.bench_sync --device cuda
run 150 sample_gpu benchmarks.bench_sample --device cuda  # eager, bf16 autocast, each also from CUDA graphs
run 120 clients_gpu benchmarks.bench_clients --device cuda --ranks 1 --ema 0.999  # NCCL: one rank per GPU
run 120 step_gpu_compile benchmarks.bench_step --device cuda --compile --archs ddpm-unet,diffusers \
  --warmup 5 --iters 20
exit $status
