"""The sweep tool: flags and overrides, refusals before training, cells run as launch.py, and a
real two-cell sweep (its report's parts: test_sweep_report.py)."""

import json
import os
import signal
import subprocess
import time

import matplotlib.image
import pytest
from conftest import PYTHON, REPO, last_line, run_python, write_synthetic
from sweep_fakes import TINY, fake_result, sweep_flags, table_row

from mfb_jax import sweep, sweep_config
from mfb_jax.errors import ConfigError, WorkdirError


def test_a_config_files_own_error_is_one_line_naming_it(tmp_path):
  # It was a traceback and exit 1 (launch.py already gave one line).
  config = tmp_path / "mine.py"
  config.write_text("def get_config(arg=None):\n  return undefined_name\n")
  with pytest.raises(ConfigError) as error:
    sweep_config.load_config(str(config), "avgpool,concat")
  assert str(error.value) == f"--config={config}: NameError: name 'undefined_name' is not defined"


def test_cells_trained_beyond_steps_stop_the_sweep_before_its_report(tmp_path):
  # A rerun with a smaller --steps failed every such cell and rewrote results.md all failed.
  cells = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")  # --steps=40, two cells.
  for step, cell in [(40, "avgpool_concat"), (60, "avgpool_mfb")]:
    os.makedirs(tmp_path / "sweep" / cell)
    (tmp_path / "sweep" / cell / "eval_results.json").write_text(json.dumps(fake_result(step, 0.5)))
  with pytest.raises(ConfigError, match=r"avgpool_mfb is already trained to step 60 > --steps=40"):
    sweep.check_cells(cells)
  (tmp_path / "sweep" / "avgpool_mfb" / "eval_results.json").write_text(
    json.dumps(fake_result(8, 0.5))
  )
  sweep.check_cells(cells)  # Done and resumable cells pass.


def test_overrides_are_typed_and_checked():
  config = sweep_config.load_config(TINY, "avgpool,mfb")
  pairs = sweep_config.parse_sets(
    ["data.format=video", "config.data.num_classes=4716", "model.mfb.dropout=0.2"]
  )
  sweep_config.apply_overrides(config, pairs + [("data.random_frames", "true")])
  assert (config.data.format, config.data.num_classes) == ("video", 4716)
  assert config.model.mfb.dropout == 0.2 and config.data.random_frames is True
  assert (config.model.aggregator, config.model.fusion) == ("avgpool", "mfb")
  with pytest.raises(ConfigError, match="no field data.num_clases"):
    sweep_config.apply_overrides(config, [("data.num_clases", "3")])
  with pytest.raises(ConfigError, match="expected a int"):
    sweep_config.apply_overrides(config, [("train.batch_size", "big")])
  with pytest.raises(ConfigError, match="FIELD=VALUE"):
    sweep_config.parse_sets(["data.format"])
  # Read as the cell's launch.py reads it: a rerun compared '~/e-*' with its cells' '/home/me/e-*'.
  home = sweep_config.parse_sets(["data.eval_pattern=~/e-*", "predict.vocabulary=a/~/v"])
  assert home == [
    ("data.eval_pattern", os.path.expanduser("~/e-*")),
    ("predict.vocabulary", "a/~/v"),
  ]


def test_launch_args_of_a_cell(tmp_path):
  sweep = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")
  assert sweep.cells == [("avgpool", "concat"), ("avgpool", "mfb")]
  assert (sweep.steps, sweep.eval_every, sweep.batch_size, sweep.num_classes) == (40, 4, 8, 32)
  args = sweep.launch_args("avgpool", "mfb")
  assert args[1] == str(REPO / "launch.py")
  assert args[2:] == [
    f"--config={TINY}:avgpool,mfb",
    f"--workdir={tmp_path / 'sweep' / 'avgpool_mfb'}",
    "--config.data.num_classes=32",
    "--config.train.num_steps=40",
    "--config.train.eval_every=4",
    f"--config.data.train_pattern={tmp_path / 'train-*'}",
    f"--config.data.eval_pattern={tmp_path / 'eval-*'}",
  ]
  # Globs that Python's glob cannot read but the runs' (TensorFlow's) can are not refused.
  classes = sweep_flags(tmp_path, train_pattern=str(tmp_path / "train-[[:digit:]]"))
  assert sweep_config.Sweep.from_flags(classes, "cmd").train_pattern.endswith("[[:digit:]]")
  with pytest.raises(ConfigError, match="--steps"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, set=["train.num_steps=5"]), "cmd")
  # A fusion for every cell trained concat in the 'avgpool,mfb' row of results.md.
  with pytest.raises(ConfigError, match=r"^--set=model.fusion=...: each cell sets it; use --fus"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, set=["model.fusion=concat"]), "cmd")
  with pytest.raises(ConfigError, match="a cell is named twice"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, aggregations=["avgpool", "avgpool"]), "cmd")
  missing = r"no files match '/nonexistent/e-\*' \(/nonexistent does not exist\)$"
  with pytest.raises(ConfigError, match="^--eval_pattern: " + missing):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, eval_pattern="/nonexistent/e-*"), "cmd")
  # A pattern from the config is named as the config's: the sweep had blamed a flag not given.
  with pytest.raises(ConfigError, match="^the config's data.eval_pattern: " + missing):
    overrides = ["data.num_classes=32", "data.eval_pattern=/nonexistent/e-*"]
    flags = sweep_flags(tmp_path, eval_pattern=None, set=overrides)
    sweep_config.Sweep.from_flags(flags, "cmd")
  with pytest.raises(ConfigError, match="no such config"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, config="configs/nope.py"), "cmd")
  # What each cell's launch.py would refuse stops the sweep before it trains anything.
  bad_value = sweep_flags(tmp_path, set=["train.batch_size=-4"])
  with pytest.raises(ConfigError, match=r"cell avgpool,concat: config.train.batch_size=-4"):
    sweep_config.Sweep.from_flags(bad_value, "cmd")
  with pytest.raises(ConfigError, match=r"cell avgpol,concat: config.model.aggregator='avgpol'"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, aggregations=["avgpol"]), "cmd")
  with pytest.raises(ConfigError, match="takes no AGG,FUSION"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, config="configs/default.py"), "cmd")
  assert not os.path.exists(tmp_path / "sweep")


def test_run_cell_streams_progress_and_keeps_the_error_line(tmp_path, capsys):
  code = (
    "import sys; print('I1125 14:30:00.123456 99 trainer.py:170] step 2/4 (50.0%) loss 1.0');"
    "print('chatter'); print('error: labels outside num_classes', file=sys.stderr); sys.exit(2)"
  )
  log = tmp_path / "logs" / "a_b.log"
  rc, error = sweep.run_cell([PYTHON, "-c", code], str(log), "[a,b]", False, sweep.StopFlag())
  assert (rc, error) == (2, "error: labels outside num_classes")
  shown = capsys.readouterr().out.splitlines()
  assert shown == ["  [a,b] step 2/4 (50.0%) loss 1.0", "  [a,b] error: labels outside num_classes"]
  assert "chatter" in log.read_text()  # Everything goes to the cell's log.


def test_a_signal_as_a_cell_starts_reaches_it(tmp_path, monkeypatch):
  """A SIGTERM to the sweep between run_sweep's look and StopFlag knowing the cell was dropped:
  the cell trained to its end (a paper cell: 250k steps) before the sweep stopped."""
  stop, sleeper = sweep.StopFlag(), [PYTHON, "-c", "import time; time.sleep(60)"]
  popen = subprocess.Popen

  def signal_arrives_during_popen(*args, **kwargs):
    process = popen(*args, **kwargs)
    stop._handle(signal.SIGTERM, None)  # stop.child is not this process yet.
    return process

  monkeypatch.setattr(subprocess, "Popen", signal_arrives_during_popen)
  start = time.monotonic()
  assert sweep.run_cell(sleeper, str(tmp_path / "a.log"), "[a]", False, stop)[0] == -15
  assert time.monotonic() - start < 30
  monkeypatch.undo()
  started = []  # A signal before run_cell starts the cell: none is started.
  monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
  assert sweep.run_cell(sleeper, str(tmp_path / "b.log"), "[b]", False, stop) == (-15, "")
  assert started == [] and not (tmp_path / "b.log").exists()


def test_a_cell_killed_by_a_signal_is_reported_as_such(tmp_path):
  # Killed after a progress line (by the OOM killer, say), the cell's "error" was that line.
  code = "import os; print('step 4/20 (20.0%) loss 10.4', flush=True); os.kill(os.getpid(), 9)"
  log = str(tmp_path / "a_b.log")
  rc, error = sweep.run_cell([PYTHON, "-c", code], log, "[a,b]", False, sweep.StopFlag())
  assert rc == -9
  assert error == "launch.py was killed by SIGKILL; its last line: step 4/20 (20.0%) loss 10.4"
  # A real-time signal has no name in signal.Signals: it was a ValueError, the sweep's end.
  realtime = "import os; os.kill(os.getpid(), 40)"
  rc, error = sweep.run_cell([PYTHON, "-c", realtime], log, "[a,b]", False, sweep.StopFlag())
  assert (rc, error) == (-40, "launch.py was killed by signal 40")


# A sweep process running one cell that records its SIGTERM; the test kills the sweep with -9.
SWEEP_KILLED_UNDER_A_CELL = """
import sys
from mfb_jax import sweep
cell = (  # As launch.py starts: runtime.stop_with_parent().
  "import signal, sys, time\\n"
  "from mfb_jax import runtime\\n"
  "stop = lambda *a: (open(sys.argv[1], 'w').write('stopped'), sys.exit(0))\\n"
  "signal.signal(signal.SIGTERM, stop)\\n"
  "runtime.stop_with_parent()\\n"
  "print('started', flush=True)\\n"
  "time.sleep(60)"
)
args = [sys.executable, "-c", cell, sys.argv[1]]
sweep.run_cell(args, sys.argv[2], "[a,b]", True, sweep.StopFlag())
"""


def test_a_cell_stops_when_the_sweep_is_killed(tmp_path):
  # kill -9 of the sweep left its cell training, orphaned, holding the workdir's lock.
  stopped = tmp_path / "stopped"
  args = [PYTHON, "-c", SWEEP_KILLED_UNDER_A_CELL, str(stopped), str(tmp_path / "a_b.log")]
  parent = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert "started" in parent.stdout.readline()
  parent.kill()
  parent.wait(timeout=30)
  deadline = time.time() + 30
  while not stopped.exists() and time.time() < deadline:
    time.sleep(0.1)
  assert stopped.read_text() == "stopped"


# A config whose loading (the sweep's checks before any cell) takes a while, and says when.
SLOW_CONFIG = """
import pathlib, time
from configs import tiny

def get_config(arg=None):
  pathlib.Path(__file__).with_suffix(".loading").touch()
  time.sleep(30)
  return tiny.get_config(arg)
"""


def test_ctrl_c_while_the_sweep_starts_is_one_line(tmp_path):
  # Before any cell, it was a KeyboardInterrupt traceback (inside an import), or lost in a
  # garbage-collection callback and the sweep went on.
  (tmp_path / "slow.py").write_text(SLOW_CONFIG)
  flags = sweep_flags(tmp_path, config=str(tmp_path / "slow.py"))
  args = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in vars(flags).items()]
  args = [a for a in args if not a.startswith(("--eval_every=", "--verbose="))]
  command = [PYTHON, "-m", "mfb_jax.sweep", *args]
  process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (tmp_path / "slow.loading").exists() and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 130, err[-2000:]
  assert "Traceback" not in err
  assert last_line(err).startswith("error: stopped by SIGINT")


def test_files_the_sweep_cannot_write_are_one_line(tmp_path):
  # A full disk or a read-only folder: tracebacks and exit 1, from the run record, a cell's log
  # or the report.
  with pytest.raises(WorkdirError, match=r"^writing /dev/full failed \(No space left on device"):
    sweep.run_cell([PYTHON, "-c", "print(1)"], "/dev/full", "[a,b]", False, sweep.StopFlag())
  flags = sweep_flags(tmp_path)
  (tmp_path / "sweep" / sweep_config.RUNS_FILE).mkdir(parents=True)
  args = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in vars(flags).items()]
  args = [a for a in args if not a.startswith(("--eval_every=", "--verbose="))]
  result = run_python(["-m", "mfb_jax.sweep", *args])
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert last_line(result.stderr).startswith(
    f"error: writing {tmp_path}/sweep/{sweep_config.RUNS_FILE} failed (Is a directory: "
  )
  assert last_line(result.stderr).endswith("; rerun the same command to resume")


def test_a_cell_whose_log_fills_the_disk_is_stopped(tmp_path, monkeypatch):
  pid_file = tmp_path / "cell.pid"
  code = (
    f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    "while True: print('step', flush=True); time.sleep(0.01)"
  )

  class FullAfterThreeLines:
    def __init__(self):
      self.lines, self.closed = 0, False

    def write(self, text):
      self.lines += 1
      if self.lines > 3:
        raise OSError(28, "No space left on device")

    def flush(self):
      pass

    def close(self):
      self.closed = True

  monkeypatch.setattr(sweep, "open", lambda path, mode: FullAfterThreeLines(), raising=False)
  stop, log = sweep.StopFlag(), str(tmp_path / "logs" / "a_b.log")
  with pytest.raises(WorkdirError, match=rf"^writing {log} failed \(No space left on device"):
    sweep.run_cell([PYTHON, "-c", code], log, "[a,b]", False, stop)
  with pytest.raises(ProcessLookupError):  # Stopped and reaped, not left running.
    os.kill(int(pid_file.read_text()), 0)
  assert stop.child is None


def test_stop_flag_forwards_sigterm_to_the_running_cell():
  stop = sweep.StopFlag()
  stop.child = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
  stop._handle(signal.SIGINT, None)
  assert stop.child.wait(timeout=30) == -signal.SIGTERM
  assert stop.signum == signal.SIGINT


# --- A real sweep: two tiny cells through launch.py.


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("sweep_data")
  write_synthetic(
    root,
    "--num_train=48",
    "--num_eval=16",
    "--num_shards=2",
    "--num_classes=64",
    "--min_frames=8",
    "--max_frames=16",
    "--seed=3",
  )
  return {"train": str(root / "train-*"), "eval": str(root / "eval-*")}


def _sweep(workdir, data, fusions: str, *more: str):
  return run_python(
    [
      "-m",
      "mfb_jax.sweep",
      f"--workdir={workdir}",
      f"--config={TINY}",
      "--aggregations=avgpool",
      f"--fusions={fusions}",
      "--steps=4",
      "--eval_every=2",
      f"--train_pattern={data['train']}",
      f"--eval_pattern={data['eval']}",
      "--data_label=tiny synthetic",
      *more,
    ],
    timeout=600,
  )


def _tree_stamps(path) -> dict:
  return {
    os.path.join(root, name): (os.stat(os.path.join(root, name)).st_mtime_ns,)
    for root, _, files in os.walk(path)
    for name in files
  }


@pytest.mark.slow
def test_sweep_runs_skips_and_reports(sweep_data, tmp_path):
  first = _sweep(tmp_path, sweep_data, "concat,mfb")
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "[1/2] avgpool,concat" in first.stdout and "[2/2] avgpool,mfb" in first.stdout
  assert "step 4/4" in first.stdout  # The child's progress lines are streamed.
  text = (tmp_path / "results.md").read_text()
  cells = table_row(text, "Avgpooling")
  report = json.loads((tmp_path / "results.json").read_text())
  for i, (fusion, paper_gap) in enumerate((("concat", "74.2"), ("mfb", "83.3"))):
    with open(tmp_path / f"avgpool_{fusion}" / "eval_results.json") as f:
      result = json.load(f)
    assert result["step"] == 4 and result["num_examples"] == 16
    assert cells[i] == f"{100 * result['gap']:.2f} / {paper_gap}"
    assert report["cells"][i]["result"] == result
    assert [h["step"] for h in report["cells"][i]["history"]] == [2, 4]
  image = matplotlib.image.imread(tmp_path / "gap_curves_avgpool.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

  # Rerun with an extra cell that fails (its workdir is taken by a file): the finished cells are
  # skipped, untouched. (A bad config value would stop the sweep before any cell runs.)
  stamps = _tree_stamps(tmp_path / "avgpool_concat") | _tree_stamps(tmp_path / "avgpool_mfb")
  (tmp_path / "avgpool_audio").write_text("not a directory")
  second = _sweep(tmp_path, sweep_data, "audio,concat,mfb")
  assert second.returncode == 1, second.stdout[-3000:]
  assert "[1/3] avgpool,audio: FAILED" in second.stdout
  assert "not a directory" in second.stdout  # launch.py's one-line error, passed on.
  assert "[2/3] avgpool,concat: skipped" in second.stdout
  assert "[3/3] avgpool,mfb: skipped" in second.stdout
  assert stamps == _tree_stamps(tmp_path / "avgpool_concat") | _tree_stamps(
    tmp_path / "avgpool_mfb"
  )
  text = (tmp_path / "results.md").read_text()
  # The failed column (audio comes first in the paper's order), then the same numbers.
  assert table_row(text, "Avgpooling") == ["failed / 38.1", *cells]
  assert "- avgpool,audio: error:" in text and "not a directory" in text

  # Rerun with another batch size: the cells were skipped and reported under its header.
  third = _sweep(tmp_path, sweep_data, "concat,mfb", "--set=train.batch_size=4")
  assert third.returncode == 2, third.stdout[-3000:]
  assert last_line(third.stderr) == (
    f"error: cell avgpool,concat in {tmp_path} was trained with train.batch_size=8, and this "
    "sweep gives 4: rerun with the settings it was trained with, or give this sweep another "
    "--workdir"
  )
  assert (tmp_path / "results.md").read_text() == text
