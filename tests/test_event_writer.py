"""TensorBoard event writes that fail are one line naming the workdir and the reason."""

import pytest
import tensorflow as tf
from clu import asynclib

from mfb_jax import event_writer
from mfb_jax.errors import WorkdirError


def test_a_write_that_fails_in_the_background_names_the_reason(tmp_path, monkeypatch):
  # It was exit 1 with clu's advice to programmers: "AsyncError: Consider re-running the code
  # without AsyncWriter (...)", the full disk named only under --debug.
  writer = event_writer.EventWriter(str(tmp_path), just_logging=False)
  writer.write_scalars(1, {"train/loss": 2.0})
  events = str(tmp_path / "events.out.tfevents.1")

  def full_disk(*args):
    try:
      try:
        raise tf.errors.ResourceExhaustedError(None, None, f"{events}; No space left on device")
      except tf.errors.ResourceExhaustedError as e:
        raise asynclib.AsyncError(f"Error '{e}' occurred ASYNCHRONOUSLY.") from e
    except asynclib.AsyncError as e:
      raise asynclib.AsyncError("Consider re-running the code without AsyncWriter") from e

  monkeypatch.setattr(writer._writer, "write_scalars", full_disk)
  with pytest.raises(WorkdirError) as raised:
    writer.write_scalars(2, {"train/loss": 1.0})
  assert str(raised.value) == (
    f"writing TensorBoard events in {tmp_path} failed (No space left on device)"
  )
  monkeypatch.undo()
  writer.close()
  assert [p.name.startswith("events.out.tfevents.") for p in tmp_path.iterdir()] == [True]


def test_a_workdir_under_a_file_is_named_and_a_programming_error_passes_through(tmp_path):
  (tmp_path / "a-file").write_text("x")
  with pytest.raises(WorkdirError) as raised:
    event_writer.EventWriter(str(tmp_path / "a-file" / "run"), just_logging=False)
  assert str(raised.value) == (
    f"writing TensorBoard events in {tmp_path}/a-file/run failed ({tmp_path}/a-file is not a "
    "directory)"
  )
  writer = event_writer.EventWriter(str(tmp_path), just_logging=False)
  with pytest.raises(KeyError), writer._errors():  # Not a failed write: raised as it is.
    raise KeyError("train/loss")
  writer.close()
