"""scripts/install_jax_gpu.sh: the JAX CUDA plugin `make setup` picks, from a fake nvidia-smi."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_jax_gpu.sh"
JAX = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)


def _run(tmp_path, driver=None, gpus="GPU 0: NVIDIA H200 (UUID: GPU-1)", env=None):
  """The script's stdout with `nvidia-smi` faked (driver None: no nvidia-smi on PATH)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  if driver is not None:
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
      f'#!/bin/sh\nif [ "$1" = -L ]; then printf "%s" "{gpus}"; else echo "{driver}"; fi\n'
    )
    fake.chmod(0o755)
  # Only the fake and the basic tools: a real nvidia-smi elsewhere on PATH must not be found.
  path = f"{bin_dir}:/usr/bin:/bin"
  full_env = {"PATH": path, "HOME": str(tmp_path), **(env or {})}
  out = subprocess.run(
    ["bash", str(SCRIPT), "/venv/bin/python", "--dry-run"],
    env=full_env,
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.strip()


@pytest.mark.parametrize(
  "driver, extra", [("580.65.06", "cuda13"), ("595.10", "cuda13"), ("550.54.15", "cuda12")]
)
def test_driver_picks_the_cuda_plugin(tmp_path, driver, extra):
  assert _run(tmp_path, driver) == f"/venv/bin/python -m pip install --quiet jax[{extra}]=={JAX}"


def test_no_gpu_installs_nothing(tmp_path):
  assert _run(tmp_path) == ""  # No nvidia-smi at all.
  assert _run(tmp_path, "580.65.06", gpus="") == ""  # nvidia-smi, but it lists no GPU.
  assert _run(tmp_path, "580.65.06", env={"MFB_JAX_NO_GPU": "1"}) == ""


@pytest.mark.parametrize("driver", ["470.82", "N/A"])
def test_unusable_driver_says_so_and_installs_nothing(tmp_path, driver):
  out = _run(tmp_path, driver)
  assert "pip install" not in out
  assert out.startswith("[setup] GPU 0: NVIDIA H200") and "JAX stays on the CPU" in out


def test_makefile_runs_it():
  assert "scripts/install_jax_gpu.sh $(PY)" in (ROOT / "Makefile").read_text()
