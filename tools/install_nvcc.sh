#!/usr/bin/env bash
# Installs CUDA's nvcc 13.0 from PyPI into a virtual environment (no CUDA toolkit needed) and prints
# the nvcc path. The versions are pinned: unpinned, pip mixes in 13.x parts whose PTX the GPU
# machine's driver (580, CUDA 13.0) cannot load. build.rs finds nvcc at this venv's default place.
set -euo pipefail
venv="${DETOX_NVCC_VENV:-$HOME/.cache/detox/nvcc-venv}"
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc
