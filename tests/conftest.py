"""Shared fixtures: tiny synthetic shards, a trained tiny workdir and a launch.py runner."""

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = [f"--config={REPO / 'configs' / 'tiny.py'}"]

# JAX's persistent compilation cache, shared by the test processes, the xdist workers (which
# inherit this environment) and every launch.py they start: the suite compiles the same tiny
# programs dozens of times, and a cached compile halves a tiny training run. Its keys cover the
# program, the devices, the XLA flags and the jax version. The size limit turns on its file lock
# (filelock, in requirements-dev.txt), so concurrent processes never read a half-written entry.
# MFB_JAX_TEST_JAX_CACHE=0 turns it off.
if os.environ.get("MFB_JAX_TEST_JAX_CACHE", "1") != "0":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax-tests"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))


def run_python(args: list[str], env: dict | None = None, timeout: float = 300, **kw):
  """Runs `python ARGS` from the repo root; returns the CompletedProcess (text output)."""
  full_env = dict(os.environ, **(env or {}))
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return subprocess.run(
    [PYTHON, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **kw
  )


def launch(workdir, *args: str, env: dict | None = None, timeout: float = 300):
  """python launch.py --workdir=WORKDIR ARGS."""
  return run_python(["launch.py", f"--workdir={workdir}", *args], env=env, timeout=timeout)


def last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def assert_one_line_error(result, *fragments: str) -> None:
  """A failed run whose last stderr line holds every fragment, with no traceback."""
  assert result.returncode != 0, result.stdout[-1000:]
  assert "Traceback" not in result.stderr
  line = last_line(result.stderr)
  for fragment in fragments:
    assert fragment in line, line


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
  """The element types of every dot's operands in compiled HLO text."""
  types = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", hlo))
  dots = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(([^)]*)\)", hlo)
  return [tuple(types[name.strip()] for name in operands.split(",")) for operands in dots]


@functools.cache
def native_bfloat16_products() -> bool:
  """Whether this backend runs a plain bf16 x bf16 -> f32 product without widening its operands
  (XLA:CPU does where the CPU has bf16 instructions)."""
  import jax
  import jax.numpy as jnp

  probe = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  a16, b16 = jnp.ones((128, 1024), jnp.bfloat16), jnp.ones((1024, 512), jnp.bfloat16)
  return dot_operand_dtypes(probe.lower(a16, b16).compile().as_text()) == [("bf16", "bf16")]


def float64_grad(loss, *args):
  """jax.grad(loss) (first argument) at the same values as `args`, in float64 arithmetic."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  with jax.enable_x64(True):
    wide = [jnp.asarray(np.asarray(jnp.asarray(a, jnp.float32), np.float64)) for a in args]
    return np.asarray(jax.grad(loss)(*wide))


def mostly_not_bfloat16_valued(a) -> bool:
  """Whether most values of the float32 array `a` are not bfloat16 values (an array rounded to
  bfloat16 on its way would consist of them only)."""
  import jax.numpy as jnp
  import numpy as np

  return np.mean(np.asarray(a) != np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32))) > 0.5


def write_synthetic(output_dir, *extra: str) -> None:
  result = run_python(["-m", "mfb_jax.synthetic", f"--output_dir={output_dir}", *extra])
  assert result.returncode == 0, result.stderr[-2000:]


def once_per_session(tmp_path_factory, name: str, make) -> Path:
  """The directory NAME in the session's temp directory, made by make(path) once per test
  session: the xdist workers share it (the first to take its file lock makes it)."""
  import filelock

  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # The session's directory above each worker's own.
  root, done = shared / name, shared / f"{name}.done"
  with filelock.FileLock(str(shared / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(root, ignore_errors=True)
      make(root)
      done.write_text("")
  return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
  """Frame-level synthetic shards for the tiny config (64 classes, short videos)."""
  from mfb_jax import synthetic

  write = lambda root: synthetic.write_dataset(
    str(root), num_train=96, num_eval=40, num_shards=4, num_classes=64, frames=(8, 24), seed=1
  )
  root = once_per_session(tmp_path_factory, "tiny_data", write)
  return {"train": str(root / "train-*"), "eval": str(root / "eval-*")}


@pytest.fixture(scope="session")
def tiny_args(tiny_data) -> list[str]:
  """launch.py arguments for the tiny config on the tiny shards."""
  return [
    *TINY,
    f"--config.data.train_pattern={tiny_data['train']}",
    f"--config.data.eval_pattern={tiny_data['eval']}",
  ]


@pytest.fixture
def tiny_config(tiny_data):
  from configs import tiny

  config = tiny.get_config()
  config.data.train_pattern = tiny_data["train"]
  config.data.eval_pattern = tiny_data["eval"]
  return config


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_args) -> dict:
  """A workdir trained by `launch.py` on the tiny shards (6 steps: checkpoints 3 and 6, an eval at
  step 6) and that run's stdout. Tests change only copies of it (`trained_workdir`)."""

  def train(root):
    result = launch(root, *tiny_args)
    assert result.returncode == 0, result.stderr[-2000:]
    (root.parent / "tiny_trained.stdout").write_text(result.stdout)

  root = once_per_session(tmp_path_factory, "tiny_trained", train)
  stdout = (root.parent / "tiny_trained.stdout").read_text()
  return {"workdir": root, "stdout": stdout}


@pytest.fixture
def trained_workdir(tiny_trained, tmp_path) -> Path:
  """This test's own copy of the tiny_trained workdir."""
  work = tmp_path / "work"
  shutil.copytree(tiny_trained["workdir"], work)
  return work
