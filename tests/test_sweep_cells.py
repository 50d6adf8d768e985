"""A sweep's cells as child processes: their output, signals to the sweep and to them, and files
the sweep cannot write."""

import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, REPO, last_line, run_python
from sweep_fakes import sweep_flags

from mfb_jax import sweep, sweep_config
from mfb_jax.errors import WorkdirError


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
