"""launch.py from outside: one-line errors, eval and predict modes, the run summary (stopped
runs: test_launch_signals.py)."""

import csv
import gzip
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, last_line, launch, run_python

from mfb_jax import train_lock


def _tree_digest(path) -> str:
  """Of every file under path but the training lock (which names its latest holder)."""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(set(files) - {train_lock.LOCK_FILE}):
      full = os.path.join(root, name)
      digest.update(full.encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_train_then_eval_and_predict(tiny_args, tiny_trained, trained_workdir):
  assert "GAP@20" in tiny_trained["stdout"]  # The training run's summary line.
  # The tensorboard beside the Python that ran it: a bare `tensorboard` is not found unless its
  # virtualenv is activated.
  beside = Path(sys.executable).parent / "tensorboard"
  if beside.exists() and shutil.which("tensorboard") != str(beside):
    shown = os.path.relpath(beside, REPO)
    shown = str(beside) if shown.startswith("..") else shown
    assert f"TensorBoard: {shown} --logdir " in tiny_trained["stdout"]
  work = trained_workdir
  with open(work / "eval_results.json") as f:
    trained = json.load(f)
  os.remove(work / "eval_results.json")
  result = launch(work, "--mode=eval", *tiny_args)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(work / "eval_results.json") as f:
    assert json.load(f) == trained
  result = launch(work, "--mode=predict", *tiny_args)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(work / "predictions.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["VideoId", "LabelConfidencePairs"]
  assert len(rows) - 1 == trained["num_examples"] == 40
  assert len({r[0] for r in rows[1:]}) == 40
  for _, pairs in rows[1:]:
    tokens = pairs.split()
    assert len(tokens) == 40
    scores = [float(s) for s in tokens[1::2]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= int(label) < 64 for label in tokens[0::2])
  # Files without a record: one line, and the previous predictions are kept, with nothing beside.
  with gzip.open(work / "empty.tfrecord", "wb"):  # An empty GZIP stream: no record.
    pass
  before = (work / "predictions.csv").read_bytes()
  no_records = f"--config.data.predict_pattern={work / 'empty.tfrecord'}"
  result = launch(work, "--mode=predict", *tiny_args, no_records)
  assert result.returncode == 2
  assert_one_line_error(result, "no videos to predict", "empty.tfrecord")
  assert (work / "predictions.csv").read_bytes() == before
  assert not [p for p in os.listdir(work) if p.startswith("predictions.csv.")]
  missing = "--config.data.predict_pattern=/nonexistent/p*"
  result = launch(work, "--mode=predict", *tiny_args, missing)
  assert_one_line_error(result, "data.predict_pattern: no file matches '/nonexistent/p*'")
  result = launch(work, "--mode=predict", *tiny_args, "--config.data.id_feature=vid")
  assert_one_line_error(result, "has no id (data.id_feature='vid'")
  assert (work / "predictions.csv").read_bytes() == before
  assert not [p for p in os.listdir(work) if p.startswith("predictions.csv.")]


def test_bad_config_values_give_one_line(tiny_args, tmp_path):
  result = launch(tmp_path, *tiny_args, "--config.train.batch_size=-4")
  assert_one_line_error(result, "train.batch_size")
  result = launch(tmp_path, *tiny_args, "--config.model.matmul_precision=tf32")
  assert_one_line_error(result, "model.matmul_precision", "tensorfloat32", "default")
  result = launch(tmp_path, *tiny_args, "--config.model.fusion=bilinear_magic")
  assert_one_line_error(result, "model.fusion", "mfb", "concat")
  result = launch(tmp_path, *tiny_args, "--config.train.batchsize=4")  # Misspelled: locked config.
  assert result.returncode != 0 and "Traceback" not in result.stderr
  # --debug adds the traceback; the exit code and the last line stay (a bad value, a bad field).
  for bad in ("--config.train.batch_size=-4", "--config.train.batchsize=4"):
    result = launch(tmp_path, *tiny_args, bad, "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr[-2000:]
    assert last_line(result.stderr).startswith("error: "), result.stderr[-2000:]
  # An eval batch that does not split over the devices fails before training, not after it,
  # and before the workdir is made (it was left holding only .train.lock).
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = launch(tmp_path / "new", *tiny_args, "--config.eval.batch_size=4", env=eight)
  assert_one_line_error(result, "eval.batch_size")
  assert not (tmp_path / "new").exists()


def test_a_missing_workdir_gives_one_line():
  for mode in ("train", "eval", "predict"):
    result = run_python(["launch.py", f"--config={REPO / 'configs' / 'tiny.py'}", f"--mode={mode}"])
    assert result.returncode == 2
    assert_one_line_error(result, "--workdir=DIR is required", f"--mode={mode}")


def test_unusable_workdirs_and_arguments_give_one_line(tiny_args, tmp_path):
  missing = tmp_path / "never-trained"
  for mode in ("eval", "predict"):
    result = launch(missing, f"--mode={mode}", *tiny_args)
    assert result.returncode == 2
    assert_one_line_error(result, f"workdir {missing} does not exist", "--mode=train")
  assert not missing.exists()  # Looking for a checkpoint creates nothing.
  missing.mkdir()
  for mode in ("eval", "predict"):
    result = launch(missing, f"--mode={mode}", *tiny_args)
    assert_one_line_error(result, "no checkpoint in", "train first")
  assert os.listdir(missing) == []  # Not even an empty checkpoints/ directory.
  (tmp_path / "a-file").write_text("x")
  for mode in ("train", "eval"):
    result = launch(tmp_path / "a-file", f"--mode={mode}", *tiny_args)
    assert result.returncode == 2
    assert_one_line_error(result, "a-file is a file, not a directory")
  result = launch(tmp_path, *tiny_args, "stray")
  assert result.returncode == 2
  assert_one_line_error(result, "unexpected arguments: stray")
  result = launch(tmp_path, *tiny_args, "--num_processes=2", "--process_id=2")
  assert result.returncode == 2
  assert_one_line_error(result, "--process_id=2 with --num_processes=2: process ids run from 0")
  result = launch(tmp_path, f"--config={REPO / 'README.md'}")
  assert_one_line_error(result, "README.md: a config is a Python file")
  result = launch(tmp_path, *tiny_args, "--config.model.aggregation=dbof")
  assert_one_line_error(result, "unknown config field 'model.aggregation': Did you mean aggregator")
  # A misspelled leaf is named by its path; config files that are not configs; --config twice.
  result = launch(tmp_path, *tiny_args, "--config.train.steps=3")
  assert_one_line_error(result, "unknown config field 'train.steps'")
  (tmp_path / "no_get.py").write_text("x = 1\n")
  result = launch(tmp_path, f"--config={tmp_path / 'no_get.py'}")
  assert_one_line_error(result, "no_get.py: a config file needs a get_config() function")
  (tmp_path / "five.py").write_text("def get_config():\n  return 5\n")
  result = launch(tmp_path, f"--config={tmp_path / 'five.py'}")
  assert result.returncode == 2
  assert_one_line_error(result, "five.py: get_config() returned an object of type int")
  # With an override, ml_collections' words were "unknown config field 'Attribute': <class int>...".
  result = launch(tmp_path, f"--config={tmp_path / 'five.py'}", "--config.data.eval_pattern=x")
  assert_one_line_error(result, "five.py: get_config() returned an object of type int, not a")
  result = launch(tmp_path, *tiny_args, "--config=configs/tiny.py:dbof,mfb")
  assert_one_line_error(result, "--config is given 2 times")
  (tmp_path / "reads.py").write_text("def get_config():\n  return open('/nonexistent/cfg')\n")
  result = launch(tmp_path, f"--config={tmp_path / 'reads.py'}")
  assert_one_line_error(result, "reads.py: ", "No such file or directory", "/nonexistent/cfg")
  # The unknown leaf is in two overrides (train.top_k is unknown, eval.top_k is fine): no guess.
  result = launch(tmp_path, *tiny_args, "--config.eval.top_k=5", "--config.train.top_k=5")
  assert_one_line_error(result, "unknown config field 'top_k'")
  # A config file from before a field, given that field: not "unknown", default.py has it.
  old = "from configs import tiny\ndef get_config():\n  c = tiny.get_config()\n"
  (tmp_path / "old.py").write_text(old + "  del c.optim['decay_rate']\n  return c\n")
  result = launch(tmp_path, f"--config={tmp_path / 'old.py'}", "--config.optim.decay_rate=0.5")
  assert_one_line_error(result, "config field 'optim.decay_rate' is not in ", "default.py has it")


def test_a_workdir_under_the_home_directory(tmp_path, tiny_args):
  # '--workdir=~/w' (a shell leaves the '~' after '=') made a folder named '~' in the cwd.
  result = launch("~/w", "--mode=eval", *tiny_args, env={"HOME": str(tmp_path)})
  assert_one_line_error(result, f"workdir {tmp_path}/w does not exist: train into it first")
  assert not (REPO / "~").exists()


def test_missing_files_give_one_line(tmp_path):
  result = launch(
    tmp_path,
    f"--config={REPO / 'configs' / 'tiny.py'}",
    "--config.data.train_pattern=/nonexistent/train*",
    "--config.data.eval_pattern=/nonexistent/x*",
  )
  assert_one_line_error(result, "data.train_pattern: no file matches '/nonexistent/train*'")
  assert not (tmp_path / "checkpoints").exists()  # A run stopped at start-up leaves none.
  # Nothing else on stderr: TensorFlow's and XLA's start-up notices are silenced too.
  assert result.stderr.strip().splitlines() == [last_line(result.stderr)], result.stderr


def test_mismatched_checkpoint_is_refused_and_kept(tiny_args, trained_workdir):
  work = trained_workdir
  before = _tree_digest(work)
  result = launch(work, *tiny_args, "--config.model.aggregator=dbof")
  # The parameters named (not Adam's moments of them), and the setting that changed.
  assert_one_line_error(
    result, "does not match the config: it has an array params/", "the configured model lacks"
  )
  assert last_line(result.stderr).endswith(
    "; changed since its config.json: model.aggregator 'netvlad' -> 'dbof'"
  )
  assert _tree_digest(work) == before
  # A checkpoint without its metadata is called damaged, not another model's.
  os.remove(work / "checkpoints" / "6" / "default" / "_METADATA")
  result = launch(work, "--mode=eval", *tiny_args)
  assert result.returncode == 2
  assert_one_line_error(result, "cannot read checkpoint", "its metadata is missing")


def test_a_folder_where_the_mode_writes_a_file_is_refused_at_once(tiny_args, trained_workdir):
  # Predict found its predictions.csv folder after the whole pass; eval does not write one.
  (trained_workdir / "predictions.csv").mkdir()
  result = launch(trained_workdir, "--mode=predict", *tiny_args)
  assert_one_line_error(result, "its predictions.csv is a folder, where this run writes that file")
  assert "Restoring checkpoint" not in result.stderr  # Before any work.
  result = launch(trained_workdir, "--mode=eval", *tiny_args)
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_checkpoint_with_damaged_array_data_is_named(tiny_args, trained_workdir):
  # Its metadata intact, its array data cut: tensorstore's error was exit 1 and unreadable.
  data = trained_workdir / "checkpoints" / "6" / "default"
  largest = max((p for p in data.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, 0)
  config_json = (trained_workdir / "config.json").read_text()
  for mode in ("eval", "train"):
    result = launch(trained_workdir, f"--mode={mode}", *tiny_args, "--config.train.num_steps=8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert (trained_workdir / "config.json").read_text() == config_json  # Not the failed run's.
    assert_one_line_error(result, "cannot read checkpoint", "/6 (", "to resume from step 3")
  assert sorted(os.listdir(trained_workdir / "checkpoints")) == ["3", "6"]  # Nothing replaced.


def _reported(error: str, setup: str = "pass"):
  """The run of launch._report_error(ERROR), ERROR a Python expression, in a process of its own
  (it exits), with launch.py's flags parsed, after the statement `setup`."""
  flags = "launch.FLAGS(['launch.py', '--config=configs/tiny.py'])"
  code = f"import launch; {flags}; {setup}; launch._report_error({error})"
  return run_python(["-c", code], timeout=120)


def test_a_lost_peer_is_reported_as_such_whatever_the_error_type():
  # process_allgather raised the lost connection as a ValueError, which was taken for bad input
  # (exit 2 and gloo's text) on the process whose partner had stopped on bad data.
  lost = "UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error: Connection reset by peer"
  result = _reported(f"ValueError({lost!r})")
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result.stderr) == (
    f"error: another process of this run stopped (its error says why): {lost}"
  )


@pytest.mark.parametrize("processes", [1, 2])
def test_a_barrier_time_out_of_a_several_process_run_names_the_other_processes(processes):
  # A process killed during a checkpoint save: the others' orbax barrier timed out about 70 s
  # later, and that was reported as an error of their own, with the debug hint.
  text = "Timed out while waiting for async_write_complete barrier."
  several = f"import jax; jax.process_count = lambda: {processes}"
  result = _reported(f"TimeoutError({text!r})", several)
  assert result.returncode == 1, result.stderr[-2000:]
  if processes == 1:
    assert last_line(result.stderr).startswith(f"error: TimeoutError: {text} (rerun with --debug")
  else:
    assert last_line(result.stderr) == (
      f"error: another process of this run stopped or stalled (its error, if any, says why): {text}"
    )


def test_running_out_of_memory_names_the_settings_to_lower():
  # Past mfb_jax/memory.py's estimate (or where a backend gives none): XLA's own error, with what
  # to change.
  text = "RESOURCE_EXHAUSTED: Out of memory allocating 5442485080 bytes."
  result = _reported(f"RuntimeError({text!r})")
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result.stderr) == (
    f"error: RuntimeError: {text} (the batch or model is too large for this device: lower "
    "train.batch_size, eval.batch_size or data.max_frames) (rerun with --debug for the traceback)"
  )


def test_the_summary_names_only_files_that_exist(tiny_args, tiny_trained, tmp_path):
  # A run of 0 steps evaluates the initial model and saves nothing: its summary named a
  # checkpoints folder that was not there.
  lines = tiny_trained["stdout"].splitlines()
  work = tiny_trained["workdir"]
  assert f"results: {work}/eval_results.json  checkpoints: {work}/checkpoints" in lines
  result = launch(tmp_path / "w", *tiny_args, "--config.train.num_steps=0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"results: {tmp_path / 'w'}/eval_results.json" in result.stdout.splitlines()
  assert "checkpoints: " not in result.stdout


def test_eval_of_videos_without_labels_names_the_labels_feature(tiny_args, trained_workdir):
  # Labels under another key read as none: the line said "unlabelled test data?" only.
  result = launch(trained_workdir, "--mode=eval", *tiny_args, "--config.data.labels_feature=ids")
  assert_one_line_error(
    result, "videos to evaluate has a label", "(labels read from data.labels_feature='ids')"
  )
  assert result.returncode == 2


def test_a_run_past_its_num_steps_says_it_only_evaluates(tiny_args, trained_workdir):
  # It logged "Training ... from step 6 to 3", then "Already trained to step 6; evaluating".
  result = launch(trained_workdir, *tiny_args, "--config.train.num_steps=3")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Already trained to step 6 (train.num_steps=3); evaluating" in result.stderr
  assert " from step 6 to 3 " not in result.stderr


def test_eval_and_predict_read_the_workdirs_own_config(tiny_trained, trained_workdir):
  # configs/workdir.py:W rebuilds training's config from W/config.json: no flags to repeat.
  work = trained_workdir
  own = f"--config={REPO / 'configs' / 'workdir.py'}:{work}"
  trained = json.loads((work / "eval_results.json").read_text())
  result = launch(work, "--mode=eval", own)  # No data patterns given: config.json has them.
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((work / "eval_results.json").read_text()) == trained
  assert "settings differ" not in result.stderr
  # It is config.json that counts: one saying top 5 evaluates GAP@5; an override still wins.
  config = json.loads((work / "config.json").read_text())
  config["eval"]["top_k"] = 5
  (work / "config.json").write_text(json.dumps(config))
  result = launch(work, "--mode=eval", own)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((work / "eval_results.json").read_text())["gap"] != trained["gap"]
  result = launch(work, "--mode=predict", own, "--config.predict.top_k=3")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(work / "predictions.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert len(rows) - 1 == trained["num_examples"] and len(rows[1][1].split()) == 6
