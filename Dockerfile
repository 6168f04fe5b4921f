# fedrun on a CUDA PyTorch base: `docker run --gpus all fedrun train --preset quickstart ...`
# The base image brings torch and torchvision with CUDA 12.4 / cuDNN 9; pip adds the rest.
# Build from the repository root: docker build -t fedrun .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Datasets are read from (and, with --download, written to) /data: mount it (-v /path/to/data:/data).
ENV FEDRUN_DATA=/data \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/fedrun
# Metadata first, then the packages: a code change does not invalidate the dependency layer's cache
# (the base torch satisfies torch>=2.2, so pip keeps it).
COPY pyproject.toml README.md ./
COPY fedrun/ fedrun/
COPY unet/ unet/
COPY evaluation/ evaluation/
COPY slurm/ slurm/
RUN pip install . \
    && fedrun --help >/dev/null

WORKDIR /work
ENTRYPOINT ["fedrun"]
CMD ["--help"]
