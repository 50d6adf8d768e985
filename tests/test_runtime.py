"""Process set-up: XLA flags, the tcmalloc re-exec, clusters and the coordinator, stdout."""

import logging
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO

from mfb_jax import runtime

VERIFIED = metadata.version("jaxlib").startswith(runtime.XLA_CPU_FLAGS_VERIFIED_ON)
needs_verified_jaxlib = pytest.mark.skipif(
  not VERIFIED, reason="the XLA flags are only set on the jaxlib versions they were verified on"
)

FLAG = "--xla_cpu_copy_insertion_use_region_analysis"


@needs_verified_jaxlib
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


@needs_verified_jaxlib
def test_an_opt_out_set_to_0_or_false_opts_nothing_out(monkeypatch):
  # MFB_JAX_NO_TCMALLOC=0 ran without tcmalloc: any non-empty value counted.
  for value in ("0", "false", "No", " "):
    monkeypatch.setenv("MFB_JAX_NO_XLA_FLAGS", value)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    runtime.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == f"{FLAG}=true"
    assert not runtime.opted_out("MFB_JAX_NO_XLA_FLAGS")
  for value in ("1", "true", "yes"):
    monkeypatch.setenv("MFB_JAX_NO_TCMALLOC", value)
    assert runtime.opted_out("MFB_JAX_NO_TCMALLOC")


@needs_verified_jaxlib
def test_a_flags_file_or_a_bare_flag_is_left_as_the_user_wrote_it(monkeypatch, tmp_path):
  monkeypatch.delenv("MFB_JAX_NO_XLA_FLAGS", raising=False)
  flags_file = str(tmp_path / "xla_flags.txt")  # XLA reads a value without dashes as a file.
  monkeypatch.setenv("XLA_FLAGS", flags_file)
  runtime.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == flags_file
  monkeypatch.setenv("XLA_FLAGS", f"{FLAG} --xla_cpu_enable_fast_math=false")  # Bare: true.
  runtime.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == f"{FLAG} --xla_cpu_enable_fast_math=false"


@needs_verified_jaxlib
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


@pytest.mark.skipif(runtime.tcmalloc_library() is None, reason="tcmalloc not installed")
@pytest.mark.parametrize("opt_out", [False, True])
def test_a_program_re_executes_itself_with_tcmalloc_unless_opted_out(tmp_path, opt_out):
  script = tmp_path / "program.py"
  script.write_text(
    "import os, sys\n"
    f"sys.path.insert(0, {str(REPO)!r})\n"
    "from mfb_jax import runtime\n"
    "runtime.preload_tcmalloc()\n"
    "print(os.environ.get('LD_PRELOAD', ''), sys.argv[1:], sep='|')\n"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MFB_JAX_NO_TCMALLOC")}
  if opt_out:
    env["MFB_JAX_NO_TCMALLOC"] = "1"
  result = subprocess.run(
    [sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr[-2000:]
  preload, argv = result.stdout.strip().split("|")
  assert ("tcmalloc" in preload) != opt_out
  assert argv == "['--flag=1']"  # The arguments survive the re-exec.


@pytest.mark.parametrize(
  "precision, dtype, expected",
  [
    ("float32", "float32", {"HIGHEST"}),
    ("tensorfloat32", "float32", {"HIGH"}),
    ("default", "float32", {"DEFAULT"}),
    ("float32", "bfloat16", {"DEFAULT"}),  # bfloat16 models keep the platform's default.
  ],
)
def test_matmul_precision_reaches_every_product_of_the_train_step(precision, dtype, expected):
  import jax

  from configs import tiny
  from mfb_jax import bench

  config = tiny.get_config()
  config.model.matmul_precision, config.model.dtype = precision, dtype
  try:
    runtime.set_matmul_precision(config)
    _, state, step_fn = bench.fresh_train_step(config)
    text = step_fn.lower(state, bench.random_batch(config, config.train.batch_size)).as_text()
  finally:
    jax.config.update("jax_default_matmul_precision", None)
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) >= 20  # NetVLAD, MFB and the MoE, forward and backward.
  found = [set(re.findall(r"precision = \[(\w+), (\w+)\]", line)) for line in dots]
  found = [{p for pair in f for p in pair} for f in found]
  assert all(f == expected for f in found), {frozenset(f) for f in found}


def test_closed_event_loop_noise_from_library_threads_is_dropped():
  # After a failed checkpoint read, tensorstore's threads hand late results to orbax's closed
  # asyncio loop; each printed a bare traceback around the run's one-line error.
  import threading
  import types

  seen = []
  hook = runtime._without_closed_loop_noise(seen.append)
  noise = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  thread = threading.Thread(target=lambda: [hook(noise), hook(other)])
  thread.start()
  thread.join()
  assert seen == [other]
  hook(noise)  # In the main thread it is this program's own error: kept.
  assert seen == [other, noise]


def test_tensorflow_is_imported_without_keras_which_stays_importable():
  program = (
    "import sys; from mfb_jax import runtime; tf = runtime.import_tensorflow(); "
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'keras')); "
    "import keras; print(keras.optimizers.Adam.__name__, tf.data.Dataset.__name__)"
  )
  result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True)
  assert result.stdout.splitlines() == ["[]", "Adam DatasetV2"], result.stderr[-2000:]


def test_what_native_code_writes_on_stdout_goes_to_stderr():
  code = (
    "import os, sys; from mfb_jax import runtime; runtime.native_stdout_to_stderr(); "
    "print('ours'); os.write(1, b'[Gloo] native\\n'); print('ours too', flush=True)"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert result.stdout == "ours\nours too\n"
  assert result.stderr == "[Gloo] native\n"


def test_library_log_filter_keeps_warnings_and_drops_chatter_and_reported_save_failures():
  def record(path: str, level: int, msg: str, args=()) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, msg, args, (ValueError, ValueError(), None))

  orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
  keep = runtime.LibraryLogFilter().filter
  assert not keep(record(orbax, logging.INFO, "Saving step %d", (3,)))
  warning = record(orbax, logging.WARNING, "slow save")
  assert keep(warning) and warning.exc_info is None  # Kept, without its traceback.
  assert keep(record(orbax, logging.ERROR, "Failed to read %s", ("x",)))
  # A failed save's lines: its error comes again as the run's one line (CheckpointError).
  failed = "[process=%d][thread=%s][operation_id=%s] _SignalingThread.run() raised an exception: %s"
  assert not keep(record(orbax, logging.ERROR, failed, (0, "t", 3, "RESOURCE_EXHAUSTED")))
  manager = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  finalize = (
    "[process=%s][thread=%s][step=%s][wait_until_finished] Save Finalize thread (%s) failed."
  )
  assert not keep(record(manager, logging.ERROR, finalize, (0, "Main", 5, "save_finalize")))
  assert keep(record("/work/mfb_jax/checkpoint.py", logging.ERROR, failed, (0, "t", 3, "x")))
  assert keep(record("/work/mfb_jax/trainer.py", logging.INFO, "Training"))
