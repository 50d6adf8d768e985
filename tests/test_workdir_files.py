"""The workdir's files: written whole or not at all, on local disk or through gfile URLs."""

import errno
import glob
import json
import os

import ml_collections
import pytest
import tensorflow as tf

from mfb_jax import checkpoint, evaluate, predict, vocabulary, workdir_files
from mfb_jax.errors import WorkdirError


# TensorFlow's in-memory file system stands in for an object store (gs://...): a URL workdir is
# read and written through tf.io.gfile, never the local disk.
def test_url_workdir_files_go_through_gfile(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = "ram://run-a"
  workdir_files.write_config(workdir, ml_collections.ConfigDict({"seed": 3}))
  assert json.loads(tf.io.gfile.GFile(f"{workdir}/config.json").read()) == {"seed": 3}
  metrics = dict(num_examples=5, gap=0.5, map=0.25, hit_at_1=1.0, perr=0.0)
  for step in (10, 20):
    evaluate.write_results(workdir, step, metrics)
  assert json.loads(tf.io.gfile.GFile(f"{workdir}/eval_results.json").read())["step"] == 20
  history = tf.io.gfile.GFile(f"{workdir}/eval_history.jsonl").read().splitlines()
  assert [json.loads(line)["step"] for line in history] == [10, 20]
  # A last line cut short by a kill: the next evaluation's line starts on a line of its own.
  for directory in (workdir, str(tmp_path / "local")):
    history_file = f"{directory}/cut.jsonl"
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(history_file, "w") as f:
      f.write('{"step": 10}\n{"step": 2')
    workdir_files.append_line(history_file, '{"step": 30}')
    lines = tf.io.gfile.GFile(history_file).read().split("\n")
    assert lines == ['{"step": 10}', '{"step": 2', '{"step": 30}', ""]
  tf.io.gfile.rmtree(str(tmp_path / "local"))
  tf.io.gfile.remove(f"{workdir}/cut.jsonl")

  path = f"{workdir}/predictions.csv"
  parts = [f"{path}.0badcafe.part-{i:05d}" for i in range(2)]
  for part, row in zip(parts, ["v1,3 0.900000 1 0.100000\n", "v2,2 0.500000\n"], strict=True):
    with tf.io.gfile.GFile(part, "w") as f:
      f.write(row)
  predict._merge_parts(path, parts, f"{workdir}/predictions_named.csv")
  assert tf.io.gfile.GFile(path).read() == (
    "VideoId,LabelConfidencePairs\nv1,3 0.900000 1 0.100000\nv2,2 0.500000\n"
  )
  assert sorted(tf.io.gfile.listdir(workdir)) == [
    "config.json",
    "eval_history.jsonl",
    "eval_results.json",
    "predictions.csv",
  ]
  (tmp_path / "vocab.csv").write_text("label_id,label_name\n3,Game\n")
  named = f"{workdir}/named.csv"
  assert vocabulary.name_predictions(path, str(tmp_path / "vocab.csv"), named) == 2
  assert tf.io.gfile.GFile(named).read().splitlines()[1] == "v1,Game (0.900); label 1 (0.100)"
  assert list(tmp_path.iterdir()) == [tmp_path / "vocab.csv"]  # Nothing went to the local disk.


def test_inference_needs_an_existing_workdir_that_takes_new_files(tmp_path, monkeypatch):
  workdir_files.check_workdir(str(tmp_path / "new"), inference=False)  # Training creates it.
  with pytest.raises(WorkdirError, match="does not exist: train into it first"):
    workdir_files.check_workdir(str(tmp_path / "new"), inference=True)
  workdir_files.check_workdir(str(tmp_path), inference=True)
  assert os.listdir(tmp_path) == []  # The write probe is gone again.
  real_open = open

  def read_only(path, *args, **kwargs):
    if ".write-probe-" in str(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    return real_open(path, *args, **kwargs)

  (tmp_path / "checkpoints").mkdir()
  workdir_files.check_workdir(str(tmp_path), inference=False)
  assert os.listdir(tmp_path / "checkpoints") == []
  monkeypatch.setattr("builtins.open", read_only)
  for inference, uses in [(True, "eval and predict write results"), (False, "training saves")]:
    with pytest.raises(WorkdirError) as error:
      workdir_files.check_workdir(str(tmp_path), inference=inference)
    assert str(error.value) == f"cannot write to {tmp_path} (Read-only file system): {uses} there"
  workdir_files.check_workdir(str(tmp_path / "new"), inference=False)  # Training creates it.

  def checkpoints_read_only(path, *args, **kwargs):
    if f"checkpoints{os.sep}.write-probe-" in str(path):
      raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr("builtins.open", checkpoints_read_only)
  workdir_files.check_workdir(str(tmp_path), inference=True)  # Eval only reads checkpoints.
  with pytest.raises(WorkdirError, match=r"cannot write to .*checkpoints \(Permission denied\)"):
    workdir_files.check_workdir(str(tmp_path), inference=False)


def test_a_folder_where_a_run_writes_a_file_is_refused_at_start_up(tmp_path):
  # A folder predictions.csv was found only when the CSV was written, after the whole pass.
  from mfb_jax import evaluate, predict

  written = workdir_files.WRITTEN_BY_MODE
  assert written["eval"] == (evaluate.RESULTS_FILE, evaluate.HISTORY_FILE)
  assert written["train"] == (workdir_files.CONFIG_FILE, *written["eval"])
  assert written["predict"] == (predict.PREDICTIONS_FILE, predict.NAMED_PREDICTIONS_FILE)
  for mode, names in written.items():
    for name in {n for ns in written.values() for n in ns}:
      workdir = tmp_path / mode / name.replace(".", "_")
      (workdir / name).mkdir(parents=True)
      check = lambda: workdir_files.check_workdir(str(workdir), mode != "train", names)  # noqa: B023
      if name not in names:  # A folder of a name this mode does not write is no concern.
        check()
        continue
      with pytest.raises(WorkdirError) as error:
        check()
      assert str(error.value) == (
        f"cannot use workdir {workdir}: its {name} is a folder, where this run writes that "
        "file; move it away"
      )


def test_only_the_training_checkpointer_removes_cut_short_saves_and_says_so(tmp_path, monkeypatch):
  import jax.numpy as jnp

  said = []
  monkeypatch.setattr(
    checkpoint.logging, "info", lambda text, *a: said.append(str(text) % a if a else str(text))
  )

  state = {"w": jnp.arange(4.0)}
  saver = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, writer=True)
  saver.save(state, 1)
  saver.close()
  cut_short = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"  # A kill or a full disk.
  cut_short.mkdir()
  checkpoint.Checkpointer(str(tmp_path)).close()  # Eval or predict, maybe while training runs.
  assert cut_short.exists()
  assert not [line for line in said if "unfinished" in line]
  resumed = checkpoint.Checkpointer(str(tmp_path), writer=True)
  assert [line for line in said if "unfinished" in line] == [
    f"removing 1 unfinished save(s) left by a run stopped while saving (step 2: {cut_short})"
  ]
  resumed.save(state, 3)  # orbax finishes removing them before its next save.
  resumed.close()
  assert not cut_short.exists() and resumed.all_steps() == [1, 3]


def test_a_failed_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  import jax.numpy as jnp

  saver = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, writer=True)
  saver.save({"w": jnp.zeros(2)}, 1)

  def disk_full(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Failed writing [tensorstore_spec='{...}']")

  monkeypatch.setattr(saver._manager, "save", disk_full)
  with pytest.raises(checkpoint.CheckpointError) as info:
    saver.save({"w": jnp.ones(2)}, 2)
  message = str(info.value)
  assert "saving a checkpoint in" in message and "RESOURCE_EXHAUSTED" in message
  assert "tensorstore_spec" not in message and "checkpoints saved before it are intact" in message
  monkeypatch.undo()
  assert saver.all_steps() == [1]
  saver.close()
  first = checkpoint.Checkpointer(str(tmp_path / "new"), asynchronous=False, writer=True)
  monkeypatch.setattr(first._manager, "save", disk_full)
  with pytest.raises(checkpoint.CheckpointError, match="; none was saved before it$"):
    first.save({"w": jnp.ones(2)}, 1)
  first.close()


def test_a_failed_save_names_the_reason_and_closing_keeps_its_line(tmp_path, monkeypatch):
  """tensorstore's lines put the reason last, past the 400 characters kept; and orbax's close()
  raised the failed save's error again, a raw ValueError that took the one line's place."""
  import jax.numpy as jnp

  saver = checkpoint.Checkpointer(str(tmp_path), writer=True)
  saver.save({"w": jnp.zeros(2)}, 1)
  saver.wait()
  long_path = "/".join(["a-long-folder-name"] * 30)
  text = f'RESOURCE_EXHAUSTED: Error writing local file "{long_path}": [OS error {{}}'
  full = ValueError(text + " No space left on device [os_error_code='28']")

  def disk_full(*args, **kwargs):
    raise full

  monkeypatch.setattr(saver._manager, "save", disk_full)
  monkeypatch.setattr(saver._manager, "wait_until_finished", disk_full)
  close = saver._manager.close
  monkeypatch.setattr(saver._manager, "close", lambda: (close(), disk_full()))
  with pytest.raises(checkpoint.CheckpointError) as info, saver:
    saver.save({"w": jnp.ones(2)}, 2)
  message = str(info.value)
  assert message.startswith(
    f"saving a checkpoint in {tmp_path}/checkpoints failed (No space left on device: "
    "RESOURCE_EXHAUSTED: Error writing local file"
  )
  assert message.endswith("...); the checkpoints saved before it are intact") and len(message) < 500
  with pytest.raises(checkpoint.CheckpointError, match=r"failed \(No space left on device: "):
    saver.close()  # Not quietly: raised, as a CheckpointError.


def test_two_writers_of_one_file_do_not_mix(tmp_path):
  # Training and an evaluation run beside it both write eval_results.json. With one shared
  # PATH.tmp the later writer truncated the earlier one's file and the second rename failed.
  path = str(tmp_path / "eval_results.json")
  with workdir_files.atomic_file(path) as first:
    first.write('{"step": 10}')
    with workdir_files.atomic_file(path) as second:
      second.write('{"step": 20}')
    assert json.load(open(path)) == {"step": 20}
  assert json.load(open(path)) == {"step": 10}  # The last rename wins, whole.
  assert os.listdir(tmp_path) == ["eval_results.json"]  # No .tmp file left.


def test_a_file_that_cannot_be_written_is_one_line_naming_it(tmp_path):
  # A directory where eval_results.json or predictions.csv goes used to end with exit 1 and the
  # text of a failed rename, naming the writer's .tmp file.
  for name in ("eval_results.json", "eval_history.jsonl"):
    (tmp_path / name).mkdir()
    path = str(tmp_path / name)
    write = workdir_files.write_text if name.endswith(".json") else workdir_files.append_line
    with pytest.raises(WorkdirError) as raised:
      write(path, '{"step": 10}')
    assert str(raised.value).startswith(f"writing {path} failed (")
    assert ".tmp" not in str(raised.value)
  assert sorted(os.listdir(tmp_path)) == ["eval_history.jsonl", "eval_results.json"]
  # The caller's own errors inside the block pass through as they are.
  with pytest.raises(tf.errors.NotFoundError), workdir_files.atomic_file(str(tmp_path / "x")):
    tf.io.gfile.GFile(str(tmp_path / "missing")).read()
  assert sorted(os.listdir(tmp_path)) == ["eval_history.jsonl", "eval_results.json"]


def test_the_reason_of_a_failed_write_is_the_file_systems_alone():
  reason = workdir_files.failure_reason
  assert reason(OSError(28, "No space left on device")) == "No space left on device"
  assert reason(ValueError("Failed writing [os_error_code='122']")) == "Disk quota exceeded"
  flush = (
    "{{function_node __wrapped__FlushSummaryWriter}} /w/events; No space left on device\n\tFailed"
    " to flush 3 events to /w/events\n\tCould not flush events file. [Op:FlushSummaryWriter] name:"
  )
  assert reason(tf.errors.ResourceExhaustedError(None, None, flush)) == "No space left on device"
  stale = flush.replace("No space left on device", "Stale file handle")
  assert reason(tf.errors.UnavailableError(None, None, stale)) == "Stale file handle"
  # Not the file system's: an OOM, a bad argument, an error met while handling a missing file.
  oom = "OOM when allocating tensor with shape[1024,1024]"
  assert reason(tf.errors.ResourceExhaustedError(None, None, oom)) is None
  assert reason(tf.errors.InvalidArgumentError(None, None, "Expected scalar shape")) is None
  try:
    try:
      raise FileNotFoundError(2, "No such file or directory")
    except FileNotFoundError:
      raise KeyError("train/loss")  # noqa: B904 - its __context__ only, as a bug's would be.
  except KeyError as e:
    assert reason(e) is None
  try:
    raise RuntimeError("Consider re-running") from OSError(30, "Read-only file system")
  except RuntimeError as e:
    assert reason(e) == "Read-only file system"


def test_before_rename_runs_on_the_closed_file_and_only_if_it_was_written(tmp_path):
  path, seen = str(tmp_path / "predictions.csv"), []
  check = lambda: seen.append([open(p).read() for p in glob.glob(f"{path}.*.tmp")])
  with workdir_files.atomic_file(path, before_rename=check) as f:
    f.write("VideoId,LabelConfidencePairs\n" + "v,1 0.5\n" * 1000)
  assert seen == [["VideoId,LabelConfidencePairs\n" + "v,1 0.5\n" * 1000]]  # Whole, not yet PATH.
  with pytest.raises(RuntimeError), workdir_files.atomic_file(path, before_rename=check) as f:
    raise RuntimeError("the rows could not be computed")
  assert len(seen) == 1 and os.listdir(tmp_path) == ["predictions.csv"]


def test_changed_settings_against_the_workdirs_config_json(tmp_path):
  from configs import tiny

  config = tiny.get_config()
  assert workdir_files.changed_settings(str(tmp_path), config) == []  # No config.json yet.
  workdir_files.write_config(str(tmp_path), config)
  changed = config.copy_and_resolve_references()
  changed.train.update(batch_size=4, num_steps=99)  # num_steps may differ between runs.
  changed.model.dtype = "bfloat16"
  assert workdir_files.changed_settings(str(tmp_path), changed) == [
    "model.dtype 'float32' -> 'bfloat16'",
    f"train.batch_size {config.train.batch_size} -> 4",
  ]
  only_model = lambda field: field.startswith("model.")
  assert workdir_files.changed_settings(str(tmp_path), changed, only_model) == [
    "model.dtype 'float32' -> 'bfloat16'"
  ]
  # JSON that is no config ('null' crashed every resume with an AttributeError), or no JSON.
  for text in ("null", "[1, 2]", "{not json", ""):
    (tmp_path / "config.json").write_text(text)
    assert workdir_files.changed_settings(str(tmp_path), changed) == []


def test_eval_and_predict_are_told_which_model_and_input_settings_changed(tmp_path):
  # A model trained on 16 frames and evaluated on 300 (another config's default) gave no notice.
  from configs import tiny

  trained = tiny.get_config()
  workdir_files.write_config(str(tmp_path), trained)
  now = tiny.get_config()
  assert workdir_files.inference_changes(str(tmp_path), now) == []
  now.data.update(eval_pattern="/other/*", shuffle_buffer=1, prefetch_batches=9, train_pattern="")
  now.train.num_steps, now.optim.learning_rate, now.eval.top_k = 1, 0.5, 5
  now.data.random_frames = not trained.data.random_frames  # Read by training's input only.
  assert workdir_files.inference_changes(str(tmp_path), now) == []  # Not the model's, nor inputs'.
  now.data.max_frames = trained.data.max_frames * 2
  now.model.dtype = "bfloat16"
  assert workdir_files.inference_changes(str(tmp_path), now) == [
    f"data.max_frames {trained.data.max_frames} -> {now.data.max_frames}",
    "model.dtype 'float32' -> 'bfloat16'",
  ]


def test_a_field_an_older_config_json_lacks_counts_as_its_default(tmp_path):
  # A run from before model.normalize_frames, evaluated with it turned on, gave no notice.
  from configs import tiny

  older = tiny.get_config()
  del older.model["normalize_frames"], older.optim["decay_rate"]
  workdir_files.write_config(str(tmp_path), older)
  now = tiny.get_config()
  assert workdir_files.inference_changes(str(tmp_path), now) == []  # The defaults: no change.
  now.model.normalize_frames = True
  assert workdir_files.inference_changes(str(tmp_path), now) == [
    "model.normalize_frames False -> True"
  ]
