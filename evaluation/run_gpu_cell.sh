#!/usr/bin/env bash
# The GPU measurement of the evaluation issue, in one go (a few minutes on one H100): train the paper preset,
# FULL, K=2, IID, E=1, R=15 on the GPU (the paper's Figure 3 reports FID 65.7 +- 5.9 for this cell), keep
# each client's EMA (decay 0.999) besides the raw weights, and draw 1,000 samples per protocol:
#   ddpm      - ancestral over all T=1000 steps (the paper's annotated-diffusion sampler), raw and EMA;
#   ddpm-clip - the same with x0 clipped to [-1, 1] each step (Ho et al.'s code), raw and EMA;
#   ddim      - 100 DDIM steps, raw and EMA (same seed, so only the sampler differs).
# Nothing is scored here (no Inception weights needed): $OUT/cell.tar.gz holds both runs' samples, configs,
# comm.jsonl and TensorBoard logs, $OUT/cell_global{,_ema}.pt the models, $OUT/cell.log the timings. Score them on a machine with the weights:
#   tar -xzf cell.tar.gz -C runs/gpu_cell && for r in runs/gpu_cell/cell{,_clip,_ddim}; do
#     fedrun eval "$r" --stage score --ref ../shared/fid_stats/fashion_mnist_test10k.npz; done
#
# Data: $FEDRUN_DATA (default ../shared/data); a *-ubyte.gz without its *-ubyte is unpacked first, so
# that gzipped files can be carried to a machine without the data set. With this workplace's device tool
# (it sends the repository only, 64 MiB at most): stage the data once in an ignored folder,
#   echo /.gpu_data/ >> .git/info/exclude; mkdir -p .gpu_data/FashionMNIST/raw
#   for f in ../shared/data/FashionMNIST/raw/*-ubyte; do gzip -c "$f" > .gpu_data/FashionMNIST/raw/$(basename "$f").gz; done
# (about 30 MB), then run with carry [".gpu_data"]: FEDRUN_DATA=.gpu_data bash evaluation/run_gpu_cell.sh
# For a CPU smoke run: CELL_ARGS="--rounds 1 --max-local-steps 2 --subset 256 --set diffusion.timesteps=20"
#   CELL_SAMPLES=4 CELL_DDIM_STEPS=5 DEVICE=cpu bash evaluation/run_gpu_cell.sh
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-runs/gpu_cell_out}"
runs="${RUNS:-runs/gpu_cell}"
data="${FEDRUN_DATA:-../shared/data}"
samples="${CELL_SAMPLES:-1000}"
ddim_steps="${CELL_DDIM_STEPS:-100}"
device="${DEVICE:-auto}"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out" "$runs"
log="$out/cell.log"
: >"$log"
say() { echo "[cell $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

for gz in "$data"/FashionMNIST/raw/*-ubyte.gz; do
  [ -e "$gz" ] || continue
  [ -e "${gz%.gz}" ] || { say "unpacking $gz"; gunzip -kf "$gz"; }
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } |
  tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__)" | tee -a "$log"

run="$runs/cell"
rm -rf "$run" "$run"_clip "$run"_ddim
say "train: paper-fmnist FULL K=2 iid E=1 R=15 ema 0.999 ${CELL_ARGS:-}"
start=$(date +%s)
# shellcheck disable=SC2086  # CELL_ARGS is a list of flags
"$py" -m fedrun train --preset paper-fmnist --method full --clients 2 --partition iid --local-epochs 1 \
  --rounds 15 --ema 0.999 --data-root "$data" --out-dir "$runs" --name cell --device "$device" \
  ${CELL_ARGS:-} 2>&1 | tee -a "$log"
say "train wall time: $(($(date +%s) - start)) s"
cp -r "$run" "$run"_clip
cp -r "$run" "$run"_ddim

start=$(date +%s)
"$py" -m fedrun eval "$run" --stage sample --weights both --num-samples "$samples" --device "$device" \
  2>&1 | tee -a "$log"
say "sample ddpm (raw + ema, $samples each) wall time: $(($(date +%s) - start)) s"
start=$(date +%s)
"$py" -m fedrun eval "$run"_clip --stage sample --weights both --num-samples "$samples" --sampler ddpm-clip \
  --device "$device" 2>&1 | tee -a "$log"
say "sample ddpm-clip (raw + ema, $samples each) wall time: $(($(date +%s) - start)) s"
start=$(date +%s)
"$py" -m fedrun eval "$run"_ddim --stage sample --weights both --num-samples "$samples" --sampler ddim \
  --steps "$ddim_steps" --device "$device" 2>&1 | tee -a "$log"
say "sample ddim-$ddim_steps (raw + ema, $samples each) wall time: $(($(date +%s) - start)) s"

# Samples, configs, logs in one archive; the trained models (12 MB each for the paper UNet) beside it.
tar -czf "$out/cell.tar.gz" -C "$runs" --exclude checkpoints --exclude models cell cell_clip cell_ddim
cp "$run/models/global.pt" "$out/cell_global.pt"
cp "$run/models/global_ema.pt" "$out/cell_global_ema.pt"
say "wrote $(cd "$out" && du -h cell.tar.gz cell_global.pt cell_global_ema.pt | tr '\t\n' ' ')"
