"""launch.py runs stopped from outside: SIGTERM saves, a signal inside a library's call, a busy
workdir, kill -9, and a signal in eval mode or before the first train step."""

import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, REPO, TINY, assert_one_line_error, last_line, launch, run_python


def _start(workdir, tiny_args, *extra):
  return subprocess.Popen(
    [
      PYTHON,
      "launch.py",
      f"--workdir={workdir}",
      *tiny_args,
      "--config.train.num_steps=100000",
      "--config.train.eval_every=100000",
      *extra,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_checkpoint(workdir, process, timeout: float = 120) -> int:
  deadline = time.time() + timeout
  ckpt = os.path.join(workdir, "checkpoints")
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    steps = [s for s in steps if s >= 6]
    if steps:
      return max(steps)
    assert process.poll() is None, process.communicate()[1][-2000:]
    time.sleep(0.2)
  process.kill()
  raise AssertionError("no checkpoint appeared")


def test_sigterm_saves_and_exits_zero(tiny_args, tmp_path):
  process = _start(tmp_path, tiny_args)
  seen = _wait_for_checkpoint(tmp_path, process)
  process.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  process.send_signal(signal.SIGTERM)  # A second one must not cut the save short.
  _, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  names = os.listdir(tmp_path / "checkpoints")
  steps = sorted(int(d) for d in names if d.isdigit())
  assert steps[-1] >= seen
  assert not [d for d in names if not d.isdigit()]  # No save left cut short.
  assert "Received SIGTERM: saving a checkpoint" in err
  assert f"Stopped at step {steps[-1]} after a signal; checkpoint saved" in err


# launch.py with a checkpoint restore that fails as tensorstore's did when a SIGTERM landed inside
# it: with an error of its own, the signal's exception as its cause.
SIGNALLED_DURING_RESTORE = """
import os, runpy, signal, sys, time
from mfb_jax import checkpoint
def restore(self, abstract_state, step=None):
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
  except BaseException as e:
    raise RuntimeError("Encountered error while reading array index") from e
checkpoint.Checkpointer.restore = restore
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_a_signal_that_a_library_turns_into_an_error_is_reported_as_the_signal(
  tiny_args, trained_workdir
):
  args = ["-c", SIGNALLED_DURING_RESTORE, f"--workdir={trained_workdir}", "--mode=eval"]
  result = run_python([*args, *tiny_args], env={"MFB_JAX_NO_TCMALLOC": "1"}, timeout=120)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM"), result.stderr[-2000:]
  assert "RuntimeError" not in result.stderr


def test_second_training_run_on_a_busy_workdir_is_refused(tiny_args, tmp_path):
  first = _start(tmp_path, tiny_args)
  _wait_for_checkpoint(tmp_path, first)
  second = launch(tmp_path, *tiny_args)  # Unlocked, it would soon finish with exit code 0.
  first.send_signal(signal.SIGTERM)
  _, err = first.communicate(timeout=120)
  assert_one_line_error(second, "is in use by another training run", f"pid {first.pid} ")
  assert first.returncode == 0, err[-2000:]  # The first run was not disturbed.
  # Eval may read a workdir while it trains; after the first run the workdir is free again.
  assert launch(tmp_path, *tiny_args, "--mode=eval").returncode == 0


@pytest.mark.slow
def test_kill_9_loses_only_steps_since_the_last_checkpoint(tiny_args, tmp_path):
  process = _start(tmp_path, tiny_args, "--config.train.checkpoint_every=2")
  _wait_for_checkpoint(tmp_path, process)
  time.sleep(1.0)
  process.kill()
  process.communicate()
  committed = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert committed
  latest = committed[-1]
  result = launch(
    tmp_path,
    *tiny_args,
    f"--config.train.num_steps={latest + 2}",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=100000",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"from step {latest} " in result.stderr
  assert str(latest + 2) in os.listdir(tmp_path / "checkpoints")


def test_a_signal_during_evaluation_stops_eval_mode_at_once(tiny_args, trained_workdir, tmp_path):
  # A slow eval: 4,000 videos of the tiny data's kind, one per step. (Copies of the tiny eval
  # split, as this test used, hold each video id many times: eval stops at the 41st video, and
  # the signal could come after that.)
  work, shards = trained_workdir, tmp_path / "shards"
  from mfb_jax import synthetic

  synthetic.write_dataset(
    str(shards), num_train=0, num_eval=4000, num_shards=4, num_classes=64, frames=(8, 24), seed=2
  )
  results = (work / "eval_results.json").read_bytes()
  args = [
    *tiny_args[:-1],
    f"--config.data.eval_pattern={shards}/eval-*",
    "--config.eval.batch_size=1",
  ]
  process = subprocess.Popen(
    [PYTHON, "launch.py", f"--workdir={work}", "--mode=eval", *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines, deadline = [], time.time() + 120
  while not any("Restoring checkpoint" in line for line in lines) and time.time() < deadline:
    lines.append(process.stderr.readline())
  time.sleep(1.0)  # Restored, compiling or evaluating: every phase must stop the same way.
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 130, "".join(lines) + err[-2000:]
  assert "Traceback" not in err
  assert last_line(err).startswith("error: stopped by SIGINT")
  assert (work / "eval_results.json").read_bytes() == results
  assert not [p for p in os.listdir(work) if p.endswith(".tmp")]


# Training whose first train step gets a SIGTERM as it starts (compiled, not yet run).
SIGNALLED_IN_THE_FIRST_STEP = """
import os, signal, sys
from configs import tiny
from mfb_jax import signals, trainer
from mfb_jax import train as train_lib
signals.install()
jit_train_step = train_lib.jit_train_step

def signalled_jit_train_step(*args):
  step_fn, calls = jit_train_step(*args), []
  def step(*step_args):
    if not calls:
      os.kill(os.getpid(), signal.SIGTERM)
    calls.append(1)
    return step_fn(*step_args)
  step.lower = step_fn.lower  # The memory check compiles it first (mfb_jax/memory.py).
  return step

train_lib.jit_train_step = signalled_jit_train_step
config = tiny.get_config()
config.data.train_pattern, config.data.eval_pattern = sys.argv[2:4]
trainer.train_and_evaluate(config, sys.argv[1])
print("not reached")
"""


def test_a_signal_before_the_first_step_has_run_stops_training_at_once(tiny_data, tmp_path):
  # Nothing new to save: no checkpoint, one line, exit 143 (not a save after the first step).
  args = ["-c", SIGNALLED_IN_THE_FIRST_STEP, str(tmp_path), tiny_data["train"], tiny_data["eval"]]
  result = run_python(args, env={"TF_ENABLE_ONEDNN_OPTS": "0"}, timeout=120)
  assert result.returncode == 143, result.stderr[-2000:]
  assert "not reached" not in result.stdout and "Traceback" not in result.stderr
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM")
  assert "Received SIGTERM" not in result.stderr
  assert not (tmp_path / "checkpoints").exists()  # Nothing saved: not even the directory.


# launch.py whose summary (after the run's work is written) gets a SIGTERM as it starts: the
# summary's first look at the workdir sends it.
SIGNALLED_AFTER_THE_WORK = """
import os, runpy, signal, sys
import tensorflow as tf
exists = tf.io.gfile.exists
def signalled_exists(path):
  os.kill(os.getpid(), signal.SIGTERM)
  return exists(path)
tf.io.gfile.exists = signalled_exists
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_signal_once_the_results_are_written_is_ignored(tiny_args, trained_workdir, mode):
  # It ended the finished run with 143 and "rerun the same command", and the rerun evaluated the
  # last step again (a second line of it in eval_history.jsonl).
  args = ["-c", SIGNALLED_AFTER_THE_WORK, f"--workdir={trained_workdir}", f"--mode={mode}"]
  result = run_python([*args, *tiny_args], env={"MFB_JAX_NO_TCMALLOC": "1"}, timeout=180)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "GAP@" in result.stdout and "error:" not in result.stderr
  assert f"results: {trained_workdir}/eval_results.json" in result.stdout


# launch.py that gets a SIGTERM as it starts to name the predictions (predictions.csv written).
SIGNALLED_WHILE_NAMING = """
import os, runpy, signal, sys
from mfb_jax import vocabulary
name_predictions = vocabulary.name_predictions
def signalled(*args):
  os.kill(os.getpid(), signal.SIGTERM)
  return name_predictions(*args)
vocabulary.name_predictions = signalled
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_a_signal_while_predictions_are_named_is_ignored(tiny_args, trained_workdir, tmp_path):
  # It exited 143 with predictions.csv written but no predictions_named.csv; a rerun predicted
  # the whole split again.
  names = tmp_path / "vocabulary.csv"
  names.write_text("label_id,label_name\n" + "".join(f"{i},name{i}\n" for i in range(64)))
  args = ["-c", SIGNALLED_WHILE_NAMING, f"--workdir={trained_workdir}", "--mode=predict"]
  args += [*tiny_args, f"--config.predict.vocabulary={names}"]
  result = run_python(args, env={"MFB_JAX_NO_TCMALLOC": "1"}, timeout=180)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "error:" not in result.stderr
  named = (trained_workdir / "predictions_named.csv").read_text().splitlines()
  assert named[0] == "VideoId,Labels" and len(named) == 41 and "name" in named[1]


# launch.py whose error exit gets a SIGINT as it starts (absl's log flush sends it).
SIGNALLED_AT_AN_ERROR_EXIT = """
import os, runpy, signal, sys
from absl import logging
flush = logging.flush
def signalled_flush():
  os.kill(os.getpid(), signal.SIGINT)
  flush()
logging.flush = signalled_flush
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_a_signal_once_the_error_is_decided_keeps_its_exit_code(tmp_path):
  # In CI a SIGINT that came as eval stopped at bad data ended the process with -2.
  args = ["-c", SIGNALLED_AT_AN_ERROR_EXIT, f"--workdir={tmp_path}", *TINY]
  result = run_python([*args, "--config.train.batch_size=-4"], env={"MFB_JAX_NO_TCMALLOC": "1"})
  assert result.returncode == 2, result.stderr[-2000:]
  assert last_line(result.stderr).startswith("error: config.train.batch_size=-4 is invalid")
