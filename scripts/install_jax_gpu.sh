#!/usr/bin/env bash
# Best effort, run by `make setup`: where nvidia-smi lists an NVIDIA GPU, install JAX's CUDA
# plugin for the pinned jax (requirements.txt), so that training and `--mode=bench` run on the GPU
# with no step by hand. The CUDA 13 wheels need an NVIDIA driver >= 580, the CUDA 12 ones >= 525.
# Without a GPU (or with MFB_JAX_NO_GPU=1) nothing is installed and JAX runs on the CPU.
#
#   scripts/install_jax_gpu.sh PYTHON [--dry-run]   # --dry-run: print the pip command only
set -u
PY=${1:?usage: scripts/install_jax_gpu.sh PYTHON [--dry-run]}
DRY=${2:-}
[ "${MFB_JAX_NO_GPU:-}" = 1 ] && exit 0
command -v nvidia-smi >/dev/null 2>&1 || exit 0
GPU=$(nvidia-smi -L 2>/dev/null | head -n 1)
[ -n "$GPU" ] || exit 0
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
MAJOR=${DRIVER%%.*}
case "$MAJOR" in
  '' | *[!0-9]*)
    echo "[setup] $GPU: could not read the NVIDIA driver version; JAX stays on the CPU"
    exit 0
    ;;
esac
if [ "$MAJOR" -ge 580 ]; then
  CUDA=cuda13
elif [ "$MAJOR" -ge 525 ]; then
  CUDA=cuda12
else
  echo "[setup] $GPU: driver $DRIVER is older than JAX's CUDA wheels need (525); JAX stays on the CPU"
  exit 0
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
JAX=$(grep -E '^jax==' "$HERE/requirements.txt" | head -n 1 | cut -d= -f3)
[ -n "$JAX" ] || { echo "[setup] no jax== pin in requirements.txt; JAX stays on the CPU"; exit 0; }
CMD=("$PY" -m pip install --quiet "jax[$CUDA]==$JAX")
if [ "$DRY" = --dry-run ]; then
  echo "${CMD[*]}"
  exit 0
fi
echo "[setup] $GPU, driver $DRIVER: installing jax[$CUDA]==$JAX (several GB)"
"${CMD[@]}" || echo "[setup] could not install jax[$CUDA]==$JAX: JAX stays on the CPU"
exit 0
