r"""mfb-jax entry point: train, evaluate, predict or benchmark a configured model.

  python launch.py --config=configs/paper.py:netvlad,mfb --workdir=DIR [--mode=train] \
    [--config.data.train_pattern=GLOB --config.data.eval_pattern=GLOB --config.x.y=v]
  python launch.py --config=... --workdir=DIR --mode=eval       # latest checkpoint, eval split
  python launch.py --config=... --workdir=DIR --mode=predict    # Kaggle CSV of top-20 labels
  python launch.py --config=configs/workdir.py:DIR --workdir=DIR --mode=eval  # as DIR trained
  python launch.py --config=... --mode=bench                # train-step speed (no data, no workdir)
  # several processes (one per host):
  python launch.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

Kept short on purpose: the logic lives in mfb_jax/ where it is tested. Bad input ends with one
line on stderr and exit code 2 (--debug adds the traceback; the exit code stays). SIGTERM or
Ctrl-C once training has run its first step saves a checkpoint and exits 0; after the work is
done it is ignored (exit 0); at any other time it stops with exit 128 + the signal's number, at
once or when an import or JAX's compilation returns (mfb_jax/signals.py).
"""

import os
import sys
import traceback

from mfb_jax import cli, cluster, peer_stop, runtime, signals

if __name__ == "__main__":
  signals.install()  # First: a Ctrl-C even during the imports below ends with one line.
  runtime.stop_with_parent()  # A sweep's cell: stops if the sweep dies.
  runtime.preload_tcmalloc()
  runtime.set_xla_cpu_flags()

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_file(
  None,
  "Config file (configs/X.py[:ARG]); configs/workdir.py:W is a trained workdir's own config.",
  lock_config=True,
)
flags.declare_key_flag("config")  # Listed by --help, not only by --helpfull.
flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs and results (optional for --mode=bench)."
)
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "bench"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool(
  "debug", False, "Also print an error's traceback (the one-line error and exit code stay)."
)
flags.mark_flags_as_required(["config"])


def run(config, workdir: str, mode: str) -> None:
  """Runs one mode and prints where its results are (config and workdir already checked)."""
  runtime.set_matmul_precision(config)
  if mode == "train":
    from mfb_jax import trainer

    result = trainer.train_and_evaluate(config, workdir)
    _report(config, workdir, result)
  elif mode == "eval":
    from mfb_jax import evaluate

    result = evaluate.run_eval(config, workdir)
    signals.work_done()  # Its results are written: a signal from here on is ignored.
    _report(config, workdir, result)
  elif mode == "predict":
    from mfb_jax import predict

    path = predict.run_predict(config, workdir)  # It calls signals.work_done().
    _print(f"wrote {path}")
    if config.predict.vocabulary:
      _print(f"wrote {workdir}/{predict.NAMED_PREDICTIONS_FILE} (label names)")
  else:
    from mfb_jax import bench

    bench.run_bench(config, workdir)


def _print(line: str) -> None:
  import jax

  if jax.process_index() == 0:
    print(line, flush=True)


def _report(config, workdir: str, result: dict | None) -> None:
  if result:
    _print(
      f"GAP@{config.eval.top_k} {result['gap']:.4f}  mAP {result['map']:.4f}  "
      f"Hit@1 {result['hit_at_1']:.4f}  PERR {result['perr']:.4f}  "
      f"({result['num_examples']} videos, step {result['step']})"
    )
  import tensorflow as tf  # tf.io.gfile: the workdir may be a URL (gs://...).

  results, checkpoints = f"{workdir}/eval_results.json", f"{workdir}/checkpoints"
  # A run stopped by a signal before its first evaluation has none yet; one of 0 steps, no
  # checkpoint.
  where = [f"results: {results}"] if tf.io.gfile.exists(results) else []
  if tf.io.gfile.exists(checkpoints) and tf.io.gfile.listdir(checkpoints):
    where.append(f"checkpoints: {checkpoints}")
  if where:
    _print("  ".join(where))
  _print(f"TensorBoard: {_tensorboard()} --logdir {workdir}")


def _tensorboard() -> str:
  """The tensorboard command beside this Python (.venv/bin/tensorboard unless the venv is
  activated: a bare `tensorboard` is then not found)."""
  import shutil

  here = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  if not os.path.exists(here) or shutil.which("tensorboard") == here:
    return "tensorboard"
  relative = os.path.relpath(here)
  if relative.startswith(".."):
    return here
  return relative if os.sep in relative else os.path.join(".", relative)  # The shell's PATH.


def _exit_after_error(code: int, line: str) -> None:
  """Exits with `line` as the last thing on stderr. Library threads that die noisily after a
  failure (orbax's closed event loop after a failed checkpoint read, while this line was being
  printed) print into /dev/null from here on; the line goes to a copy of stderr.

  A process of a multi-process run exits without jax.distributed's shutdown barrier: after an
  error on this process alone (a bad record in its files) the others wait in a collective and
  would never reach the barrier; with this process gone their collective fails. Process 0 first
  tells the others, which exit with one line (mfb_jax/peer_stop.py).
  """
  signals.ignore_until_exit()  # The exit code is decided: a late signal ended it with -2 or -15.
  signals.own_exit()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(sys.stderr.fileno())
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
  os.write(stderr, f"error: {line}\n".encode("utf-8", "backslashreplace"))
  if _several_processes():
    peer_stop.on_error_exit()
    os._exit(code)
  sys.exit(code)


def _several_processes() -> bool:
  """Whether this is a process of a multi-process run (JAX not imported yet: no)."""
  return "jax" in sys.modules and sys.modules["jax"].process_count() > 1


def _peer_timed_out(first: str) -> bool:
  """Whether an error of a multi-process run is a barrier that another process never reached
  (killed during a checkpoint save: orbax's barrier gives up after about 70 s)."""
  text = first.lower()
  timed_out = "timed out" in text or "deadline_exceeded" in text
  return _several_processes() and "barrier" in text and timed_out


_DEBUG_HINT = " (rerun with --debug for the traceback)"


def _report_error(e: Exception) -> None:
  """One line on stderr; exit 2 for bad input (config, data, workdir), 1 for anything else."""
  from mfb_jax.errors import UserError, lost_peer

  first = (str(e).strip().splitlines() or [""])[0]
  # A collective that lost a peer (raised as a ValueError by process_allgather, for one): the
  # reason is in the other process's error line.
  if lost_peer(first):
    _exit_after_error(1, f"another process of this run stopped (its error says why): {first}")
  if _peer_timed_out(first):  # orbax's barrier at the end of a checkpoint save, for one.
    _exit_after_error(
      1, f"another process of this run stopped or stalled (its error, if any, says why): {first}"
    )
  if isinstance(e, UserError | ValueError | FileNotFoundError):
    _exit_after_error(2, " ".join(str(e).split()) or type(e).__name__)
  if "RESOURCE_EXHAUSTED" in first:  # Out of memory past mfb_jax/memory.py's estimate.
    first += " (the batch or model is too large for this device: lower train.batch_size, "
    first += "eval.batch_size or data.max_frames)"
  _exit_after_error(1, f"{type(e).__name__}: {first}" + ("" if FLAGS.debug else _DEBUG_HINT))


def _check_process_flags(num_processes: int | None, process_id: int | None) -> None:
  """One line, before any start-up, for process numbers JAX would refuse seconds later."""
  if num_processes is not None and num_processes < 1:
    cli.fail(f"--num_processes={num_processes}: it must be at least 1")
  if process_id is not None and process_id < 0:
    cli.fail(f"--process_id={process_id}: it must be 0 or more")
  if None not in (num_processes, process_id) and process_id >= num_processes:
    cli.fail(
      f"--process_id={process_id} with --num_processes={num_processes}: process ids run from 0 "
      f"to {num_processes - 1}"
    )


def main(argv) -> None:
  cli.no_positional_arguments(argv)
  cli.config(FLAGS)  # Loaded, and a ConfigDict.
  if not FLAGS.workdir and FLAGS.mode != "bench":
    cli.fail(f"--workdir=DIR is required for --mode={FLAGS.mode} (only --mode=bench runs without)")
  _check_process_flags(FLAGS.num_processes, FLAGS.process_id)

  if not FLAGS.debug:
    runtime.quiet_library_logs()
  runtime.native_stdout_to_stderr()
  try:
    from mfb_jax import config_checks, workdir_files

    # First, before TensorFlow's and the distributed runtime's start-up (seconds): a bad value
    # or workdir is reported at once, and on every process of a multi-process run alike.
    config_checks.validate(FLAGS.config, FLAGS.mode)
    if FLAGS.workdir:
      inference = FLAGS.mode in ("eval", "predict")
      writes = workdir_files.WRITTEN_BY_MODE[FLAGS.mode]
      workdir_files.check_workdir(FLAGS.workdir, inference, writes)
    runtime.hide_gpus_from_tensorflow()
    cluster.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    signals.reclaim()  # From jax.distributed's own SIGTERM handler.
    peer_stop.watch()  # Process 0 stopping ends the others with one line.
    signals.before_exit(peer_stop.on_error_exit)
    cluster.check_same_config(FLAGS.config)
    cluster.count_host_processes()
    config_checks.check_model_shapes(FLAGS.config)
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    cluster.leave_cluster()  # The one wait left (for the other processes); see work_done().
    signals.ignore_until_exit()
  except Exception as e:  # noqa: BLE001 - one line for users; --debug shows the traceback.
    if FLAGS.debug:  # The traceback first, then the same line and exit code as without.
      traceback.print_exc()
    interrupted = signals.stopped_by()
    if interrupted is not None:  # A library turned the signal's exception into an error of its own.
      signals.report(interrupted)
    _report_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
