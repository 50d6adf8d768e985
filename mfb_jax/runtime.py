"""Process set-up that must happen before JAX or TensorFlow start: allocator, XLA flags, devices.

This module imports nothing heavy at import time: launch.py calls preload_tcmalloc() first.
"""

import logging as logging_lib
import os
import re
import sys
import threading

TCMALLOC_CANDIDATES = (
  "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_library() -> str | None:
  """The installed tcmalloc library (the first of TCMALLOC_CANDIDATES that exists), or None."""
  return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def tcmalloc_loaded() -> bool:
  """Whether tcmalloc is mapped into this process (what the benchmarks report)."""
  with open("/proc/self/maps") as f:
    return "tcmalloc" in f.read()


def opted_out(variable: str) -> bool:
  """Whether an opt-out variable (MFB_JAX_NO_TCMALLOC, MFB_JAX_NO_XLA_FLAGS) is set: any value
  but empty, 0, false or no (before 2026-12-07 any value opted out, MFB_JAX_NO_TCMALLOC=0 too)."""
  return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no")


def preload_tcmalloc(module: str | None = None) -> None:
  """Re-executes this process with tcmalloc preloaded when it is installed.

  glibc returns large freed buffers to the OS and maps fresh ones every step; tcmalloc keeps them,
  which measured +15% to +33% train-step throughput on 2-core CPUs (BENCHMARKS.md). Set
  MFB_JAX_NO_TCMALLOC=1 to opt out. Without the library nothing changes. `module`: the name a
  `python -m NAME` program was started with (its sys.argv[0] is a path that `-m` needs again).
  """
  if opted_out("MFB_JAX_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
    return
  lib = tcmalloc_library()
  if lib is None:
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
  sys.stdout.flush()
  sys.stderr.flush()
  program = ["-m", module] if module else sys.argv[:1]
  os.execve(sys.executable, [sys.executable, *program, *sys.argv[1:]], env)


# XLA:CPU options the train step measured faster with (BENCHMARKS.md, "Levers"), for the jaxlib
# versions they were verified on (XLA aborts the process on a flag it does not know).
# Region-based copy insertion drops the defensive copy of every donated parameter that XLA
# otherwise makes before updating it in place (134 MB for MFB's U): +3-5% on NetVLAD+MFB.
XLA_CPU_FLAGS = {"xla_cpu_copy_insertion_use_region_analysis": "true"}
XLA_CPU_FLAGS_VERIFIED_ON = ("0.10.",)


# tf.data's batch-sized map calls (a batch parsed, or finished) in flight or done and waiting:
# one per core, as AUTOTUNE starts with, but never more than this. AUTOTUNE may go up to the core
# count, and each call holds a whole batch: on a 64-core host, 64 batches (11 GB at batch 128 and
# 300 frames) beside the prefetched ones. At the 38-41 core-ms per batch of 128 measured on the
# 2-core Zen 5 (BENCHMARKS.md), eight would parse about 25,000 paper-sized videos a second.
MAX_BATCH_CALLS = 8


def batch_calls() -> int:
  """How many batch-sized tf.data map calls the input pipeline runs at once (memory.py counts
  their batches)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  return max(1, min(cores, MAX_BATCH_CALLS))


# The sweep sets it for each cell: the pid whose death stops the cell (stop_with_parent).
STOP_WITH_ENV = "MFB_JAX_STOP_WITH"


def stop_with_parent() -> None:
  """Where MFB_JAX_STOP_WITH=PID names this process's parent (the sweep, for its cells): a
  SIGTERM, which saves and stops, when that process dies, kill -9 included (Linux). An orphaned
  cell trained on and held its workdir's lock against the sweep's rerun."""
  pid = os.environ.get(STOP_WITH_ENV, "")
  if not pid.isdigit() or not sys.platform.startswith("linux"):
    return
  import ctypes
  import signal

  PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h
  ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != int(pid):  # The parent died before that took effect.
    os.kill(os.getpid(), signal.SIGTERM)


def set_xla_cpu_flags() -> None:
  """Adds XLA_CPU_FLAGS to the XLA_FLAGS environment variable; a flag the user set wins.

  Call before JAX creates its backends (XLA reads XLA_FLAGS once). MFB_JAX_NO_XLA_FLAGS=1 opts
  out; jaxlib versions other than the verified ones, and an XLA_FLAGS that names a flags file,
  are left alone.
  """
  if opted_out("MFB_JAX_NO_XLA_FLAGS"):
    return
  from importlib import metadata

  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  if not version.startswith(XLA_CPU_FLAGS_VERIFIED_ON):
    return
  current = os.environ.get("XLA_FLAGS", "").strip()
  if current and not current.startswith("-"):
    return  # XLA reads a value without dashes as the path of a file of flags: leave it whole.
  named = lambda k: re.search(rf"(^|\s)--{k}(=|\s|$)", current)
  extra = [f"--{k}={v}" for k, v in XLA_CPU_FLAGS.items() if not named(k)]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def set_matmul_precision(config) -> str | None:
  """Sets JAX's default precision of float32 products from config.model.matmul_precision.

  JAX's own default computes float32 products in TF32 on NVIDIA GPUs since Ampere and in bfloat16
  passes on TPUs; 'float32' asks for full float32. A bfloat16 model keeps the platform's default
  (its products are bfloat16 by choice). Returns the value set (None: the platform's default).
  """
  import jax

  value = config.model.matmul_precision
  precision = None if value == "default" or config.model.dtype == "bfloat16" else value
  jax.config.update("jax_default_matmul_precision", precision)
  return precision


def hide_gpus_from_tensorflow() -> None:
  """tf.data runs on the CPU only; keep TensorFlow from grabbing accelerator memory. Without
  TensorFlow installed (an accelerator machine benchmarking the bare step) there is none."""
  from importlib import util

  if util.find_spec("tensorflow") is None:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import_tensorflow().config.set_visible_devices([], "GPU")


def import_tensorflow():
  """`import tensorflow`, less the import of Keras that TensorFlow makes at its own import (only
  to register Keras' optimizers for SavedModel loading; this project uses neither): about 1 s of
  its 5 s on a 2-core CPU, in eval, predict and bench processes (training imports Keras later
  anyway, through clu's TensorBoard writer). Keras stays importable afterwards, and is imported
  as usual where TensorFlow was, or Keras' optimizers were, imported before."""
  blocked = "tensorflow" not in sys.modules and "keras.src.optimizers" not in sys.modules
  if blocked:  # TensorFlow's import_module() of it raises ImportError, which TensorFlow ignores.
    sys.modules["keras.src.optimizers"] = None
  try:
    import tensorflow as tf
  finally:
    if blocked and sys.modules.get("keras.src.optimizers", False) is None:
      del sys.modules["keras.src.optimizers"]
  return tf


def native_stdout_to_stderr() -> None:
  """Points file descriptor 1 at stderr, with sys.stdout kept on the real stdout.

  Native libraries write to descriptor 1 on their own: gloo printed "[Gloo] Rank 0 is connected
  to 1 peer ranks ..." in every multi-process run, before the bench mode's JSON line. stdout is
  for launch.py's own lines; whatever else a library prints there goes to stderr.
  """
  try:
    sys.stdout.flush()
    ours = os.dup(1)
  except (OSError, ValueError, AttributeError):  # No usable stdout: nothing to keep apart.
    return
  os.dup2(2, 1)
  encoding, errors = sys.stdout.encoding, sys.stdout.errors
  sys.stdout = os.fdopen(ours, "w", buffering=1, encoding=encoding, errors=errors)


# INFO lines from these libraries (orbax's per-save chatter, clu's echo of every metric, jax's
# backend probing) would bury the progress lines; their warnings and errors still show.
QUIET_LIBRARIES = ("/orbax/", "/clu/", "/jax/_src/", "/etils/")


def quiet_library_logs() -> None:
  """Drops INFO records of QUIET_LIBRARIES from absl's handler, and the tracebacks attached to
  their warnings and errors (orbax logs one per failed write; the run's error line follows)."""
  from absl import logging

  logging.get_absl_handler().addFilter(LibraryLogFilter())
  sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


# orbax's E lines for a save that failed in its background threads (a full disk: four lines of
# the same tensorstore error). It keeps the exception for the next wait or save, where the run
# stops with its one line naming the reason (checkpoint.CheckpointError); --debug shows them.
_FAILED_SAVE_LINES = (
  "_SignalingThread.run() raised an exception",
  "Handler Commit operations or the Commit callback in background save thread",
  "Save Finalize thread (%s) failed",
)


class LibraryLogFilter(logging_lib.Filter):
  """quiet_library_logs' filter of absl's handler."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    if not any(s in path for s in QUIET_LIBRARIES):
      return True
    record.exc_info = record.exc_text = None
    if record.levelno < logging_lib.WARNING or _empty_checkpoint_metadata(record):
      return False
    return not ("/orbax/" in path and any(s in str(record.msg) for s in _FAILED_SAVE_LINES))


def _empty_checkpoint_metadata(record) -> bool:
  """Whether `record` is orbax's error line for an empty _CHECKPOINT_METADATA file, which a run
  killed while orbax wrote it leaves: orbax reads it as missing (timestamps only; the restore is
  the same) but logged an E line for each of its three reads on every resume."""
  args = record.args if isinstance(record.args, tuple) else ()
  return (
    str(record.msg).startswith("Failed to json parse Metadata file")
    and len(args) > 1
    and not str(args[1]).strip()
  )


def _without_closed_loop_noise(previous):
  """An unraisablehook that drops "Event loop is closed" from threads other than the main one.

  After a failed checkpoint read, tensorstore's threads still complete the other reads and hand
  them to orbax's asyncio loop, closed by then: each printed a bare traceback, in 3 of 5 runs,
  around the run's one-line error.
  """

  def hook(unraisable) -> None:
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and (
      str(unraisable.exc_value) == "Event loop is closed"
    )
    if closed_loop and threading.current_thread() is not threading.main_thread():
      return
    previous(unraisable)

  return hook
