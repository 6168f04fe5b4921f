#!/usr/bin/env bash
# The GPU measurement of the evaluation issue, in one go (a few minutes on one H100): train the paper preset,
# FULL, K=2, IID, E=1, R=15 on the GPU (the paper's Figure 3 reports FID 65.7 +- 5.9 for this cell), keep
# each client's EMA (decay 0.999) besides the raw weights, and draw 1,000 samples per protocol:
#   ddpm      - ancestral over all T=1000 steps (the paper's annotated-diffusion sampler), raw and EMA;
#   ddpm-clip - the same with x0 clipped to [-1, 1] each step (Ho et al.'s code), raw and EMA;
#   ddim      - 100 DDIM steps, raw and EMA (same seed, so only the sampler differs).
# CELL_CENTRAL=1 adds the paper's centralised baseline (K=1, 15 epochs; the paper: FID 42.5 +- 1.1) with the
# same three protocols: the run that tells which protocol reproduces the paper.
# Nothing is scored here (no Inception weights needed): $OUT/cell.tar.gz holds every run's samples, config,
# comm.jsonl and TensorBoard logs, $OUT/cell_global{,_ema}.pt the FULL cell's models, $OUT/cell.log the
# timings. Score them on a machine with the weights:
#   tar -xzf cell.tar.gz -C runs/gpu_cell && for r in runs/gpu_cell/*/; do
#     fedrun eval "$r" --stage score --ref ../shared/fid_stats/fashion_mnist_test10k.npz; done
#
# Data: $FEDRUN_DATA (default ../shared/data); a *-ubyte.gz without its *-ubyte is unpacked first, so
# that gzipped files can be carried to a machine without the data set. With this workplace's device tool
# (it sends the repository only, 64 MiB at most): stage the data once in an ignored folder,
#   echo /.gpu_data/ >> .git/info/exclude; mkdir -p .gpu_data/FashionMNIST/raw
#   for f in ../shared/data/FashionMNIST/raw/*-ubyte; do gzip -c "$f" > .gpu_data/FashionMNIST/raw/$(basename "$f").gz; done
# (about 30 MB), then run with carry [".gpu_data"]: FEDRUN_DATA=.gpu_data bash evaluation/run_gpu_cell.sh
# For a CPU smoke run: CELL_ARGS="--rounds 1 --max-local-steps 2 --subset 256 --set diffusion.timesteps=20"
#   CELL_SAMPLES=4 CELL_BATCH=4 CELL_DDIM_STEPS=5 CELL_CENTRAL=1 DEVICE=cpu bash evaluation/run_gpu_cell.sh
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-runs/gpu_cell_out}"
runs="${RUNS:-runs/gpu_cell}"
data="${FEDRUN_DATA:-../shared/data}"
samples="${CELL_SAMPLES:-1000}"
ddim_steps="${CELL_DDIM_STEPS:-100}"
device="${DEVICE:-auto}"
batch="${CELL_BATCH:-1000}"  # sampling batch: all 1,000 samples at once on a GPU
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

# train NAME FLAGS...: one run of the paper preset (E=1, R=15, EMA 0.999 kept beside the raw weights)
train() {
  local name=$1 start
  shift
  rm -rf "$runs/$name" "$runs/$name"_clip "$runs/$name"_ddim
  say "train $name: paper-fmnist E=1 R=15 ema 0.999 $* ${CELL_ARGS:-}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # CELL_ARGS is a list of flags
  "$py" -m fedrun train --preset paper-fmnist --local-epochs 1 --rounds 15 --ema 0.999 --data-root "$data" \
    --out-dir "$runs" --name "$name" --device "$device" "$@" ${CELL_ARGS:-} 2>&1 | tee -a "$log"
  say "train $name wall time: $(($(date +%s) - start)) s"
}
# sample RUN SAMPLER [FLAGS...]: 1,000 samples of the raw and the EMA model, same seed, not scored
sample() {
  local dir=$1 sampler=$2 start
  shift 2
  start=$(date +%s)
  "$py" -m fedrun eval "$dir" --stage sample --weights both --num-samples "$samples" --sampler "$sampler" \
    --batch-size "$batch" --device "$device" "$@" 2>&1 | tee -a "$log"
  say "sample $dir $sampler $* (raw + ema, $samples each) wall time: $(($(date +%s) - start)) s"
}
# protocols NAME: the three samplers on copies of one trained run
protocols() {
  cp -r "$runs/$1" "$runs/$1"_clip
  cp -r "$runs/$1" "$runs/$1"_ddim
  sample "$runs/$1" ddpm
  sample "$runs/$1"_clip ddpm-clip
  sample "$runs/$1"_ddim ddim --steps "$ddim_steps"
}

names=(cell cell_clip cell_ddim)
train cell --method full --clients 2 --partition iid
protocols cell
if [ "${CELL_CENTRAL:-0}" = 1 ]; then  # the paper's centralised baseline: K=1, 15 epochs (42.5 +- 1.1)
  train central --method full --clients 1
  protocols central
  names+=(central central_clip central_ddim)
fi

# Samples, configs, logs in one archive; the FULL cell's models (12 MB each for the paper UNet) beside it.
tar -czf "$out/cell.tar.gz" -C "$runs" --exclude checkpoints --exclude models "${names[@]}"
cp "$runs/cell/models/global.pt" "$out/cell_global.pt"
cp "$runs/cell/models/global_ema.pt" "$out/cell_global_ema.pt"
say "wrote $(cd "$out" && du -h cell.tar.gz cell_global.pt cell_global_ema.pt | tr '\t\n' ' ')"
