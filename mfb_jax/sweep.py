r"""Runs the paper's grid of cells (aggregation x fusion) with launch.py; reports GAP vs the paper.

  python -m mfb_jax.sweep --workdir=sweeps/synth --config=configs/paper.py \
    --aggregations=avgpool --fusions=audio,video,concat,fc_concat,mfb --steps=20000 \
    --train_pattern='/data/synth/train-*' --eval_pattern='/data/synth/eval-*' \
    [--set=data.num_classes=4716 ...] [--data_label='synthetic, seed 0']

Each cell is a fresh `python launch.py` process with workdir DIR/<agg>_<fusion>; its full output
goes to DIR/logs/<agg>_<fusion>.log, its progress lines to this terminal. A cell whose
eval_results.json is at the target step is skipped on a rerun; an interrupted cell resumes from its
checkpoints (launch.py does that). A failed cell is reported and the others still run; the exit
code is then 1. After every cell DIR/results.md, DIR/results.json and DIR/gap_curves_*.png are
rewritten (mfb_jax/sweep_report.py).
"""

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from mfb_jax import signals

if __name__ == "__main__":
  signals.install()  # First: Ctrl-C during the imports and checks below is one line, exit 130.

from absl import app, flags  # noqa: E402

from mfb_jax import cli, runtime, sweep_config, sweep_report  # noqa: E402
from mfb_jax.errors import ConfigError, UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so importing adds none."""
  flags.DEFINE_string("workdir", None, "Sweep directory; cell AGG,FUSION trains in DIR/AGG_FUSION.")
  flags.DEFINE_string("config", "configs/paper.py", "Config file taking 'AGG,FUSION' as its ARG.")
  flags.DEFINE_list("aggregations", list(sweep_report.AGGREGATIONS), "Rows of the grid, in order.")
  flags.DEFINE_list("fusions", list(sweep_report.FUSIONS), "Columns of the grid, in order.")
  flags.DEFINE_integer("steps", None, "Training steps per cell (default: the config's num_steps).")
  flags.DEFINE_integer(
    "eval_every", None, "Steps between evals (default: steps/10 with --steps, else the config's)."
  )
  flags.DEFINE_string("train_pattern", None, "Glob(s) of training tfrecords (else the config's).")
  flags.DEFINE_string("eval_pattern", None, "Glob(s) of evaluation tfrecords (else the config's).")
  flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (e.g. data.format=video).")
  flags.DEFINE_string("data_label", "", "What the data is, shown in results.md.")
  flags.DEFINE_bool("verbose", False, "Show every line of launch.py's output, not just progress.")
  flags.mark_flags_as_required(["workdir"])


# launch.py lines worth showing while a cell runs (the rest is in DIR/logs/CELL.log).
_PROGRESS = re.compile(r"step \d+/\d+ \(|eval at step|^error:|signal|Stopped at step|from step \d+")
# absl's log prefix, e.g. "I1125 14:30:00.123456 1234 trainer.py:170] ".
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")


def format_duration(seconds: float) -> str:
  """H:MM:SS."""
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopFlag:
  """SIGINT/SIGTERM: forward SIGTERM to the running cell (it checkpoints) and stop after it."""

  def __init__(self):
    self.signum = 0
    self.child: subprocess.Popen | None = None

  def install(self) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    print(f"sweep: signal {signum}; letting the running cell save and stop", flush=True)
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def run_cell(args: list[str], log_path: str, prefix: str, verbose: bool, stop: StopFlag):
  """Runs launch.py ARGS, streaming progress lines; returns (exit code, error line or ''). A log
  that cannot be written (a full disk) is a WorkdirError naming it; the cell, whose output has
  nowhere to go, is stopped (SIGTERM: it saves a checkpoint if it can)."""
  from mfb_jax import workdir_files  # Deferred: imports JAX.

  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env[runtime.STOP_WITH_ENV] = str(os.getpid())  # The cell stops if the sweep dies (kill -9).
  error, last, process, log = "", "", None, None
  if stop.signum:  # A signal since run_sweep looked: the cell is not started (nor logged).
    return -stop.signum, ""
  try:
    with workdir_files.write_errors(log_path):
      os.makedirs(os.path.dirname(log_path), exist_ok=True)
      log = open(log_path, "a")  # noqa: SIM115 - closed below, after the cell has stopped.
      log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(args)}\n")
      log.flush()
    # stderr merged into stdout: one pipe, so no deadlock, and lines keep their order.
    process = subprocess.Popen(
      args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    stop.child = process
    if stop.signum:  # It came while Popen ran, before _handle could see the cell: passed on now.
      process.send_signal(signal.SIGTERM)
    for line in process.stdout:
      with workdir_files.write_errors(log_path):
        log.write(line)
      text = _ABSL_PREFIX.sub("", line.rstrip())
      if not text.strip():
        continue
      last = text
      if text.startswith("error:"):
        error = text
      if verbose or _PROGRESS.search(text):
        print(f"  {prefix} {text}", flush=True)
    code = process.wait()
    with workdir_files.write_errors(log_path):
      log.close()
  finally:
    if process is not None and process.poll() is None:  # Its log failed (or a signal): stop it.
      process.terminate()
      for _ in process.stdout:  # Read on, so that it never waits on a full pipe.
        pass
      process.wait()
    stop.child = None
    if log is not None and not log.closed:
      with contextlib.suppress(OSError):  # The error on its way names the log already.
        log.close()
  if code < 0 and not error:  # No line of its own: the OOM killer's SIGKILL, for one.
    error = f"launch.py was killed by {signals.name(-code)}"
    error += f"; its last line: {last}" if last else ""
  elif code != 0 and not error:
    error = last or f"launch.py exited with code {code}"
  return code, error


def _eta(durations: list[float], remaining: int) -> str:
  if not durations:
    return "ETA unknown (no cell trained yet)"
  return f"ETA {format_duration(sum(durations) / len(durations) * remaining)}"


def run_sweep(sweep: sweep_config.Sweep, stop: StopFlag) -> int:
  """Runs every cell in order, rewrites the report after each; returns the exit code."""
  start = time.time()
  durations: list[float] = []
  outcomes: dict[tuple[str, str], dict] = {}
  cells = sweep.cells
  for i, (agg, fusion) in enumerate(cells, 1):
    if stop.signum:
      break
    name = f"{agg},{fusion}"
    cell_dir = sweep.cell_dir(agg, fusion)
    head = f"[{i}/{len(cells)}] {name}"
    state = sweep_report.cell_state(cell_dir, sweep.steps)
    if state == "done":
      gap = sweep_report.read_result(cell_dir)["gap"]
      print(f"{head}: skipped, already at step {sweep.steps} (GAP {100 * gap:.2f})", flush=True)
      outcomes[(agg, fusion)] = {"status": "done", "skipped": True}
      continue
    if state != "todo":
      print(f"{head}: FAILED: {state}", flush=True)
      outcomes[(agg, fusion)] = {"status": "failed", "error": state}
      continue
    elapsed = format_duration(time.time() - start)
    print(f"{head}: training to step {sweep.steps} in {cell_dir} (elapsed {elapsed})", flush=True)
    cell_start = time.time()
    log_path = os.path.join(sweep.workdir, "logs", f"{agg}_{fusion}.log")
    args = sweep.launch_args(agg, fusion)
    code, error = run_cell(args, log_path, f"[{name}]", sweep.verbose, stop)
    took = time.time() - cell_start
    state = sweep_report.cell_state(cell_dir, sweep.steps)
    if code == 0 and state == "done":
      durations.append(took)
      gap = sweep_report.read_result(cell_dir)["gap"]
      eta = _eta(durations, len(cells) - i)
      print(f"{head}: done in {format_duration(took)}, GAP {100 * gap:.2f}; {eta}", flush=True)
      outcomes[(agg, fusion)] = {"status": "done", "skipped": False}
    elif stop.signum:
      print(f"{head}: interrupted after {format_duration(took)}; rerun to resume", flush=True)
      outcomes[(agg, fusion)] = {"status": "interrupted"}
    else:
      error = error or f"finished without an evaluation at step {sweep.steps} ({state})"
      print(f"{head}: FAILED after {format_duration(took)}: {error}", flush=True)
      print(f"  full output: {log_path}", flush=True)
      outcomes[(agg, fusion)] = {"status": "failed", "error": error}
    sweep_report.write_report(sweep, outcomes)
  paths = sweep_report.write_report(sweep, outcomes)
  return _summarize(sweep, outcomes, paths, time.time() - start, stop)


def check_cells(sweep: sweep_config.Sweep) -> None:
  """Refuses a sweep whose workdir holds cells trained beyond --steps, or with other data or
  settings, before it rewrites the report: run anyway, every cell trained beyond would fail and
  results.md would lose their results; a cell trained otherwise would be skipped (or resumed)
  and reported under this sweep's header."""
  beyond = []
  for agg, fusion in sweep.cells:
    state = sweep_report.cell_state(sweep.cell_dir(agg, fusion), sweep.steps)
    if state not in ("todo", "done"):
      beyond.append(state)
    _check_same_settings(sweep, agg, fusion)
  if beyond:
    more = f" (and {len(beyond) - 1} more cell(s))" if len(beyond) > 1 else ""
    raise ConfigError(f"{beyond[0]}{more}")


def _check_same_settings(sweep: sweep_config.Sweep, agg: str, fusion: str) -> None:
  """ConfigError where the cell's config.json (from an earlier sweep) differs from this sweep's
  config of the cell in a setting that changes what its GAP means (data, model, optimizer)."""
  path = os.path.join(sweep.cell_dir(agg, fusion), "config.json")
  if not os.path.exists(path):
    return
  from mfb_jax import workdir_files  # Deferred: imports JAX.

  with open(path) as f:
    before = json.load(f)
  differing = workdir_files.differing_settings(before, sweep.cell_config(agg, fusion))
  for field, was, now in differing[:1]:
    raise ConfigError(
      f"cell {agg},{fusion} in {sweep.workdir} was trained with {field}={was!r}, and this sweep "
      f"gives {now!r}: rerun with the settings it was trained with, or give this sweep another "
      "--workdir"
    )


def _summarize(sweep, outcomes: dict, paths: list[str], took: float, stop: StopFlag) -> int:
  failed = [f"{a},{f}" for (a, f), o in outcomes.items() if o["status"] == "failed"]
  print(f"sweep finished in {format_duration(took)}; wrote {', '.join(paths)}", flush=True)
  print(sweep_report.summary_lines(sweep, outcomes), flush=True)
  if stop.signum:
    print("sweep: stopped by a signal; rerun the same command to resume", flush=True)
    return 128 + stop.signum
  if failed:
    print(f"sweep: {len(failed)} cell(s) failed: {' '.join(failed)}", file=sys.stderr, flush=True)
    return 1
  return 0


def main(argv) -> None:
  cli.no_positional_arguments(argv)
  try:
    command = shlex.join(["python", "-m", "mfb_jax.sweep", *sys.argv[1:]])
    sweep = sweep_config.Sweep.from_flags(FLAGS, command)
    check_cells(sweep)
    sweep.hold_lock()
  except (UserError, ValueError) as e:  # Bad flags or config: one line, before any training.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  stop = StopFlag()
  try:
    sweep.record_run()
    stop.install()
    code = run_sweep(sweep, stop)
  except UserError as e:  # The sweep's own files (a full disk): one line; cells keep theirs.
    print(f"error: {e}; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(2)
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
