"""Process set-up: XLA flags and the tcmalloc re-exec."""

import os
import subprocess
import sys

from conftest import REPO

from mfb_jax import runtime

FLAG = "--xla_cpu_copy_insertion_use_region_analysis"


def test_xla_cpu_flags_are_added_to_what_the_user_set(monkeypatch):
  monkeypatch.delenv("MFB_JAX_NO_XLA_FLAGS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  runtime.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}=true"
  runtime.set_xla_cpu_flags()  # Idempotent: re-executed processes call it again.
  assert os.environ["XLA_FLAGS"].count(FLAG) == 1


def test_a_flag_the_user_set_wins_and_the_opt_out_and_other_jaxlibs_change_nothing(monkeypatch):
  monkeypatch.delenv("MFB_JAX_NO_XLA_FLAGS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=false")
  runtime.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == f"{FLAG}=false"
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setenv("MFB_JAX_NO_XLA_FLAGS", "1")
  runtime.set_xla_cpu_flags()
  assert "XLA_FLAGS" not in os.environ
  monkeypatch.delenv("MFB_JAX_NO_XLA_FLAGS")
  monkeypatch.setattr(runtime, "XLA_CPU_FLAGS_VERIFIED_ON", ("0.0.",))
  runtime.set_xla_cpu_flags()
  assert "XLA_FLAGS" not in os.environ


def test_the_flags_are_known_to_the_installed_xla():
  """XLA aborts on a flag it does not know: a jaxlib that drops one must fail here first."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MFB_JAX_NO_XLA_FLAGS")}
  code = (
    "from mfb_jax import runtime; runtime.set_xla_cpu_flags(); "
    "import jax; print(jax.numpy.ones(2).sum())"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "2.0"
