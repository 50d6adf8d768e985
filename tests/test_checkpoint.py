"""Restoring checkpoints: damaged steps named with the step to resume from, other errors kept."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest
from conftest import launch

from mfb_jax import checkpoint as checkpoint_lib
from mfb_jax.errors import CheckpointError


def test_restore_errors_not_about_the_checkpoint_pass_through(tmp_path, monkeypatch):
  """Damaged data is a CheckpointError that says to move the step aside; a lost peer or memory
  is not the checkpoint's fault, and keeps its own error."""
  state = {"w": jnp.arange(6.0)}
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False, writer=True)
  checkpointer.save(state, 1)
  checkpointer.close()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  assert float(checkpointer.restore(abstract)["w"][5]) == 5.0
  for text, kind in [
    (
      "Encountered error while reading array index. See full TensorStore details: <bound",
      CheckpointError,
    ),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate", RuntimeError),
    ("Connection closed by peer", RuntimeError),
  ]:

    def fail(*args, text=text, **kwargs):
      raise RuntimeError(text)

    monkeypatch.setattr(checkpointer._manager, "restore", fail)
    with pytest.raises(kind) as error:
      checkpointer.restore(abstract)
    assert type(error.value) is kind
    assert ("it is damaged" in str(error.value)) == (kind is CheckpointError)
    assert "TensorStore details" not in str(error.value)


def test_a_damaged_step_is_named_with_the_step_to_resume_from(tmp_path):
  """However a step is damaged, one line names it and the step a resume would start from."""
  state = {"w": jnp.arange(6.0)}
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False, writer=True)
  for step in (1, 2):
    checkpointer.save(state, step)
  checkpointer.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  directory = tmp_path / "checkpoints"
  shutil.rmtree(directory / "2" / "default")  # orbax: "Unable to retrieve default item..."
  with pytest.raises(CheckpointError) as error:
    checkpoint_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert str(error.value) == (
    f"cannot read checkpoint {directory}/2 (its 'default' item is missing); it is damaged or "
    f"was not written by this project: move {directory}/2 out of {directory} to resume from "
    "step 1"
  )
  shutil.move(directory / "2", tmp_path / "2.damaged")  # What the line says to do.
  assert float(checkpoint_lib.Checkpointer(str(tmp_path)).restore(abstract)["w"][5]) == 5.0
  os.remove(directory / "1" / "default" / "_METADATA")
  with pytest.raises(CheckpointError, match=r"/1 \(its metadata is missing\).*start again from"):
    checkpoint_lib.Checkpointer(str(tmp_path)).restore(abstract)


def test_a_reader_beside_training_reads_the_newest_step_when_its_step_is_removed(
  tmp_path, monkeypatch
):
  # Eval beside a run with keep_checkpoints=1 met the latest step removed under it, and said:
  # "cannot read checkpoint .../20 ...: move it out ... to start again from step 0".
  writer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1, asynchronous=False, writer=True)
  writer.save({"w": jnp.full(4, 1.0)}, 1)
  reader = checkpoint_lib.Checkpointer(str(tmp_path))
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  restore, calls = reader._manager.restore, []

  def training_saves_meanwhile(step, **kwargs):
    calls.append(step)
    if len(calls) == 1:
      writer.save({"w": jnp.full(4, 2.0)}, 2)  # keep=1: step 1 is removed.
      assert writer.all_steps() == [2]
    return restore(step, **kwargs)

  monkeypatch.setattr(reader._manager, "restore", training_saves_meanwhile)
  assert float(reader.restore(abstract)["w"][0]) == 2.0
  assert calls == [1, 2]
  writer.close()


def test_an_empty_checkpoint_metadata_file_is_read_without_error_lines(trained_workdir, tiny_args):
  # A run killed while orbax wrote _CHECKPOINT_METADATA leaves it empty; orbax reads it as
  # missing (the restore is the same) but logged "E... Failed to json parse Metadata file" lines.
  (trained_workdir / "checkpoints" / "6" / "_CHECKPOINT_METADATA").write_text("")
  result = launch(trained_workdir, *tiny_args, "--mode=eval")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Metadata file" not in result.stderr
  assert json.loads((trained_workdir / "eval_results.json").read_text())["step"] == 6
