"""The train step and the loop, in-process on tiny synthetic shards."""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from mfb_jax import checkpoint as checkpoint_lib
from mfb_jax import evaluate, input_pipeline, label_check, trainer
from mfb_jax import train as train_lib
from mfb_jax.bench_input import frame_record
from mfb_jax.errors import DataError, TrainingError


def _params_at(config, workdir, step):
  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(config)
  shapes = train_lib.abstract_state(config, model, tx, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  state = checkpointer.restore(shapes, step)
  checkpointer.close()
  return jax.device_get(state)


def test_train_step_lowers_the_loss_on_a_batch(tiny_config):
  mesh = train_lib.make_mesh()
  tiny_config.optim.learning_rate = 3e-3
  model, tx = train_lib.build(tiny_config)
  shapes = train_lib.abstract_state(tiny_config, model, tx, mesh)
  state = train_lib.create_state(tiny_config, model, tx, mesh)
  step_fn = train_lib.jit_train_step(tiny_config, model, tx, mesh, shapes)
  batches = input_pipeline.make_train_iterator(
    tiny_config, tiny_config.data.train_pattern, seed=0, local_batch_size=8
  )
  batch = input_pipeline.to_global(next(batches), mesh)
  losses = []
  for _ in range(40):
    state, step_metrics = step_fn(state, batch)
    losses.append(float(step_metrics["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.8 * losses[0], losses
  assert float(step_metrics["learning_rate"]) == pytest.approx(3e-3)
  assert "grad_norm" not in step_metrics  # The norms cost a pass: only when asked for.


def test_norms_are_reported_on_request_and_do_not_change_the_step(tiny_config):
  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(tiny_config)
  shapes = train_lib.abstract_state(tiny_config, model, tx, mesh)
  step_fn = train_lib.jit_train_step(tiny_config, model, tx, mesh, shapes)
  batches = input_pipeline.make_train_iterator(
    tiny_config, tiny_config.data.train_pattern, seed=0, local_batch_size=8
  )
  batch = input_pipeline.to_global(next(batches), mesh)
  start = jax.device_get(train_lib.create_state(tiny_config, model, tx, mesh).params)
  plain, _ = step_fn(train_lib.create_state(tiny_config, model, tx, mesh), batch)
  normed, m = step_fn(train_lib.create_state(tiny_config, model, tx, mesh), batch, True)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])
  np.testing.assert_array_equal(flat(plain.params), flat(normed.params))
  new, old = flat(normed.params).astype(np.float64), flat(start).astype(np.float64)
  assert float(m["param_norm"]) == pytest.approx(np.linalg.norm(new), rel=1e-5)
  assert float(m["update_norm"]) == pytest.approx(np.linalg.norm(new - old), rel=1e-3)
  assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0


def test_train_and_evaluate_writes_the_workdir_contract(tiny_config, tmp_path):
  result = trainer.train_and_evaluate(tiny_config, str(tmp_path))
  with open(tmp_path / "eval_results.json") as f:
    saved = json.load(f)
  assert saved == result
  assert set(saved) == {"step", "num_examples", "gap", "map", "hit_at_1", "perr"}
  assert saved["step"] == 6 and saved["num_examples"] == 40
  assert 0.0 <= saved["gap"] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["aggregator"] == tiny_config.model.aggregator
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_logged_rates_leave_out_evaluations_and_start_with_the_loop(
  tiny_config, tmp_path, monkeypatch
):
  tiny_config.train.update(num_steps=6, log_every=2, eval_every=2)
  logged, write_scalars = [], trainer.event_writer.EventWriter.write_scalars

  def keep(writer, step, scalars):
    logged.append(scalars)
    write_scalars(writer, step, scalars)

  evaluate_split = trainer.evaluate.evaluate_split

  def slow(*args, **kwargs):  # Each evaluation takes over a second.
    time.sleep(1.0)
    return evaluate_split(*args, **kwargs)

  monkeypatch.setattr(trainer.event_writer.EventWriter, "write_scalars", keep)
  monkeypatch.setattr(trainer.evaluate, "evaluate_split", slow)
  began = time.time()
  trainer.train_and_evaluate(tiny_config, str(tmp_path))
  took = time.time() - began
  rates = [s["train/steps_per_sec"] for s in logged if "train/steps_per_sec" in s]
  assert len(rates) == 3
  # Steps 1-2 compile the step's two variants, so their window counts them; it is timed within
  # the run (a clock left at 0 gave about 1e-9 steps/s).
  assert rates[0] > 2 / took
  # Steps 3-4 and 5-6 each follow a 1 s evaluation: counted, it would cap them at 2 steps/s.
  assert min(rates[1:]) > 4


def test_resuming_from_one_checkpoint_twice_gives_the_same_parameters(
  tiny_config, tmp_path, monkeypatch
):
  tiny_config.train.eval_every = 100  # Evaluation does not touch the state; skip it for speed.
  seeds, batches = [], input_pipeline.TrainFiles.batches
  monkeypatch.setattr(
    input_pipeline.TrainFiles,
    "batches",
    lambda self, config, seed, size: seeds.append(seed) or batches(self, config, seed, size),
  )
  half = tiny_config.copy_and_resolve_references()
  half.train.num_steps = 3
  first, second = tmp_path / "first", tmp_path / "second"
  trainer.train_and_evaluate(half, str(first))
  assert checkpoint_lib.Checkpointer(str(first)).all_steps() == [3]
  shutil.copytree(first, second)
  for workdir in (first, second):
    trainer.train_and_evaluate(tiny_config, str(workdir))
  # One stream per run, seeded by the step it starts from: checkpoint 3 did not rebuild it.
  assert seeds == [trainer.stream_seed(tiny_config, s) for s in (0, 3, 3)]
  a, b = _params_at(tiny_config, str(first), 6), _params_at(tiny_config, str(second), 6)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  three = _params_at(tiny_config, str(first), 3)
  assert not np.array_equal(jax.tree.leaves(three.params)[0], jax.tree.leaves(a.params)[0]), (
    "steps 3..6 changed nothing: the comparison above would be vacuous"
  )


def test_every_video_of_a_file_is_reached_with_a_checkpoint_every_step(tiny_config, tmp_path):
  # The stream was rebuilt from the files' starts at every checkpoint: with checkpoint_every=10
  # a bad label at video 150 of 200 was never read, and the run ended with exit 0.
  rng = np.random.default_rng(0)
  records = []
  for i in range(40):
    rgb = rng.integers(0, 256, (4, tiny_config.data.rgb_size), np.uint8)
    audio = rng.integers(0, 256, (4, tiny_config.data.audio_size), np.uint8)
    records.append(frame_record(f"v{i}", rgb, audio, [70 if i == 39 else i % 64]))
  path = str(tmp_path / "train.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  tiny_config.data.update(train_pattern=path, eval_pattern="", shuffle_buffer=4)
  tiny_config.train.update(checkpoint_every=1, num_steps=7, eval_every=100)  # 56 videos.
  with pytest.raises(DataError, match=r"video 'v39': label 70 is outside \[0, 64\)"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path / "run"))


def test_nan_loss_stops_before_saving(tiny_config, tmp_path):
  tiny_config.optim.learning_rate = 1e30
  tiny_config.train.checkpoint_every = 1
  tiny_config.train.log_every = 1
  with pytest.raises(TrainingError, match=r"^the (training loss is nan at|state after) step \d+"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  saved = checkpoint_lib.Checkpointer(str(tmp_path)).all_steps()
  for step in saved:
    state = _params_at(tiny_config, str(tmp_path), step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  # The rerun that the error advises trains on: no diverged state (finite, but with parameters
  # near 1e30, whose next loss is NaN) was saved for it to resume from.
  tiny_config.optim.learning_rate = 1e-3
  tiny_config.train.num_steps = 3
  trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps()[-1] == 3


def test_a_nan_loss_from_a_saved_state_names_that_checkpoint(tiny_config, tmp_path, monkeypatch):
  # A diverged state that the check before saving lets through (or an older version saved).
  monkeypatch.setattr(trainer.progress, "state_problem", lambda state, mesh: None)
  tiny_config.optim.learning_rate = 1e30
  tiny_config.train.update(checkpoint_every=1, log_every=1, num_steps=8)
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingError) as raised:
    trainer.train_and_evaluate(tiny_config, workdir)
  bad = int(str(raised.value).split(" at step ")[1].split(";")[0]) - 1
  directory = checkpoint_lib.checkpoint_dir(workdir)
  earlier = f"resume from step {bad - 1}" if bad > 1 else "start again from step 0"
  assert str(raised.value).endswith(
    f"; checkpoint {directory}/{bad} holds the state that gave it: "
    f"move {directory}/{bad} out of {directory} to {earlier}"
  )
  shutil.move(f"{directory}/{bad}", str(tmp_path / "aside"))  # As the line says.
  monkeypatch.undo()
  tiny_config.optim.learning_rate = 1e-3
  trainer.train_and_evaluate(tiny_config, workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps()[-1] == 8


def test_state_problem_names_non_finite_and_overflowing_arrays():
  mesh = train_lib.make_mesh()
  sound = {"params": {"w": np.full((3,), 1e18, np.float32)}, "opt": {"nu": np.ones(2)}}
  assert trainer.progress.state_problem(sound, mesh) is None
  huge = {"params": {"a": np.ones(2, np.float32), "w": np.array([1.0, 3e19], np.float32)}}
  assert trainer.progress.state_problem(huge, mesh) == (
    "the squares of params/w sum past float32's range (largest magnitude 3e+19)"
  )
  # Only parameters are squared: Adam's second moment may be large.
  assert trainer.progress.state_problem({"opt": {"nu": np.full(2, 3e19, np.float32)}}, mesh) is None
  nan = {"opt": {"mu": np.array([0.0, np.nan], np.float32)}, "step": np.int32(3)}
  assert trainer.progress.state_problem(nan, mesh) == "opt/mu holds NaN or Inf"


def test_unlabelled_training_data_is_refused(tiny_config, tmp_path):
  # A misnamed labels feature reads as unlabelled videos (as test shards do): every class would
  # be trained towards 0, and the run used to end with exit 0.
  tiny_config.data.labels_feature = "label_ids"
  tiny_config.train.checkpoint_every = 100
  refused = r"none of the first 32 training videos \(to step 4\).*label_ids"
  with pytest.raises(DataError, match=refused):
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == []
  # A checkpoint due before 32 videos (step 3 of batch 8) waits for a labelled video: it was
  # saved, and a corrected relaunch resumed from parameters trained towards all-zero labels.
  tiny_config.train.checkpoint_every = 3
  with pytest.raises(DataError, match=r"none of the first 32 training videos \(to step 4\)"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == []
  # A run shorter than 32 videos decides at its last step: it ended with exit 0 and no
  # checkpoint (the end's save waited for a label that never came).
  tiny_config.train.num_steps = 2
  with pytest.raises(DataError, match=r"^none of the 16 training videos \(to step 2\) has a"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == []


def test_the_label_check_decides_on_32_videos_and_warns_once(tiny_config, monkeypatch):
  warnings = []
  monkeypatch.setattr(label_check.logging, "warning", lambda *args: warnings.append(args))
  check = label_check.LabelCheck(tiny_config)
  none, some = np.zeros((8, 6), np.float32), np.zeros((8, 6), np.float32)
  some[3, 2] = 1
  for step in (1, 2, 3):  # 24 unlabelled videos: not yet enough to refuse...
    check(none, step)
  check(some, 4)  # ...and one labelled video among the first 32 is enough to go on.
  check(none, 5)
  assert [w[1:] for w in warnings] == [(8, 8, 1)]  # Once.
  with pytest.raises(DataError, match="none of the first 32"):
    fresh = label_check.LabelCheck(tiny_config)
    for step in (1, 2, 3, 4):
      fresh(none, step)
      assert not fresh.may_save(step)  # Periodic checkpoints wait for a labelled video.
  assert check.may_save(5)


def test_a_signal_after_a_saved_evaluation_stops_at_that_step(tiny_config, tmp_path, monkeypatch):
  # Step 3 is saved and evaluated; the signal comes as its results are written. The run trained
  # step 4 and saved there, so its resume left the periodic checkpoints' exact rule.
  from mfb_jax import evaluate

  tiny_config.train.update(num_steps=100, eval_every=3, checkpoint_every=3)
  write_results = evaluate.write_results

  def signalled_write(*args, **kwargs):
    written = write_results(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return written

  monkeypatch.setattr(evaluate, "write_results", signalled_write)
  assert trainer.train_and_evaluate(tiny_config, str(tmp_path))["step"] == 3
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == [3]


def test_a_signal_during_an_evaluation_gives_it_up_and_the_resumed_run_redoes_it(
  tiny_config, tmp_path, monkeypatch
):
  from mfb_jax import evaluate

  # Evaluations at steps 4 and 5, checkpoints every 3: step 4 is saved only because of the stop.
  tiny_config.train.update(num_steps=100, eval_every=4, checkpoint_every=3)
  tiny_config.eval.batch_size = 2  # 20 eval batches.
  scored, update = [], evaluate.Progress.update

  def signalled_update(progress, num_examples):
    scored.append(num_examples)
    if len(scored) == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # As `kill` would, in the middle of the evaluation.
    update(progress, num_examples)

  monkeypatch.setattr(evaluate.Progress, "update", signalled_update)
  assert trainer.train_and_evaluate(tiny_config, str(tmp_path)) is None  # No evaluation finished.
  assert len(scored) == 3  # Given up at the next batch, not after the remaining 17.
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == [3, 4]
  assert evaluate.evaluated_steps(str(tmp_path)) == set()

  monkeypatch.setattr(evaluate.Progress, "update", update)
  tiny_config.train.num_steps = 5
  result = trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert result["step"] == 5
  assert evaluate.evaluated_steps(str(tmp_path)) == {4, 5}  # Step 4's evaluation first.
  # A run resumed at an evaluation step whose result exists does not evaluate it again.
  tiny_config.train.num_steps = 6
  trainer.train_and_evaluate(tiny_config, str(tmp_path))
  with open(tmp_path / "eval_history.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [4, 5, 6]
  with open(tmp_path / evaluate.HISTORY_FILE, "ab") as f:  # Damaged lines do not block resuming.
    f.write(b'{"step": 1e400}\n\xff\xfe garbage\n["step"]\n{"step": "six"}\n{"step": 7}\n')
  assert evaluate.evaluated_steps(str(tmp_path)) == {4, 5, 6, 7}


def test_stream_seeds_differ_and_repeat():
  config = default.get_config()
  assert trainer.stream_seed(config, 1000) == trainer.stream_seed(config, 1000)
  assert trainer.stream_seed(config, 1000) != trainer.stream_seed(config, 2000)


def test_eval_max_examples_counts_videos_over_all_processes(tiny_config, monkeypatch):

  asked = []

  def local_batches(config, pattern, max_examples=0, stop=None):
    asked.append(max_examples)
    return iter(())

  monkeypatch.setattr(evaluate, "local_batches", local_batches)
  for processes, max_examples, per_process in [(1, 5, 5), (2, 5, 3), (4, 8, 2), (2, 0, 0)]:
    monkeypatch.setattr(evaluate.jax, "process_count", lambda n=processes: n)
    tiny_config.eval.max_examples = max_examples
    with pytest.raises(DataError, match="split is empty"):  # The stand-in reads no videos.
      evaluate.evaluate_split(tiny_config, None, None, None, "unused")
    assert asked.pop() == per_process


def test_model_names_tell_the_models_options_apart():
  """Bench rows and messages name the model: each option that changes it shows in the name."""
  from configs import paper

  config = paper.get_config("netvlad,mfb")
  assert train_lib.model_name(config) == "netvlad+mfb+moe"
  config.model.update(context_gating=True, normalize_frames=True, dtype="bfloat16")
  assert train_lib.model_name(config) == "unit-frames+netvlad+mfb+moe+cg/bfloat16"
  config.model.update(fusion_level="frame", context_gating=False, normalize_frames=False)
  assert train_lib.model_name(config) == "frame-mfb+netvlad+moe/bfloat16"
