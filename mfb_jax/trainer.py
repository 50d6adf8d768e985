"""The training loop: train_and_evaluate(config, workdir).

Resume rule (data position): a run reads one training stream from its start to its end, seeded by
(config.seed, the step it starts from): every record of every file is reached, however often
checkpoints are saved. The stream cannot be resumed mid-file (a tfrecord is read from its start;
skipping the records read before would mean reading them again), so a resumed run draws a fresh
stream seeded by (config.seed, the resume step): its batches are not those a straight run would
have seen next, but resuming from the same checkpoint twice gives the same run. (Each resume
starts its files from their first records again: a run resumed very often reads mostly the first
part of each file.)

Evaluation rule: a run resumed at an evaluation step (a multiple of train.eval_every) that has no
line in eval_history.jsonl evaluates it first; its evaluation was given up at a signal or killed.
"""

import contextlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax import checkpoint as checkpoint_lib
from mfb_jax import (
  config_checks,
  errors,
  evaluate,
  event_writer,
  input_files,
  input_pipeline,
  memory,
  progress,
  signals,
  train_lock,
  workdir_files,
)
from mfb_jax import train as train_lib


def _stop_agreed() -> bool:
  """Whether a signal asked any process to stop (all processes stop at the same step)."""
  if jax.process_count() == 1:
    return signals.requested()
  return bool(np.any(multihost_utils.process_allgather(np.array([signals.requested()]))))


def stream_seed(config: ml_collections.ConfigDict, step: int) -> int:
  """The training-stream seed of a run starting at `step` (see the module docstring)."""
  return int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains from scratch or from the latest checkpoint in workdir; returns the last eval result.

  A workdir another training run holds is refused before anything in it is touched.
  """
  _check_batches(config)  # Before the lock, which creates the workdir.
  # cleanup closes the checkpointer however the run ends: a save still being written when an
  # error stops the run is finished, not left as a temporary directory, and no orbax thread is
  # left to print tracebacks at exit.
  with train_lock.TrainingLock(workdir), contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


def _check_batches(config) -> None:
  """ConfigError unless the train batch (and, with eval data, the eval batch: now, not at the
  first evaluation) splits evenly over the run's processes and devices."""
  fields = ["train"] + (["eval"] if config.data.eval_pattern else [])
  for field in fields:
    size, name = config[field].batch_size, f"{field}.batch_size"
    config_checks.check_batch_split(size, name, jax.process_count(), jax.device_count())


def _evaluation_missed(config, workdir: str, step: int) -> bool:
  """Whether `step` (a resumed run's first) is an evaluation step whose result was never written:
  a signal gave up its evaluation, or the run was killed during it."""
  due = 0 < step < config.train.num_steps and step % config.train.eval_every == 0
  missed = due and bool(config.data.eval_pattern) and step not in evaluate.evaluated_steps(workdir)
  if jax.process_count() > 1:  # Process 0 decides: the history may change under a running eval.
    missed = bool(multihost_utils.broadcast_one_to_all(np.array(missed)))
  return missed


class LabelCheck:
  """Refuses training data without labels: none among a process's first VIDEOS training videos
  (unlabelled test shards, or a misnamed labels feature, would otherwise train every class
  towards 0 and exit 0). Decided on that many videos, not on one batch, so that a small local
  batch of partly unlabelled data is not refused by chance; periodic checkpoints wait until a
  labelled video is seen (may_save). Warns once about batches with some unlabelled videos."""

  VIDEOS = 32

  def __init__(self, config):
    self.config, self.seen, self.labelled, self.warned = config, 0, 0, False
    self.cleared = False  # Every process has seen a labelled video (may_save).

  def __call__(self, labels_BxC: np.ndarray, step: int, last: bool = False) -> None:
    """`last`: the run's last step, where it decides on however many videos it has seen."""
    labelled_B = labels_BxC.any(axis=1)
    if self.seen < self.VIDEOS:
      self.seen += len(labelled_B)
      self.labelled += int(labelled_B.sum())
      if (self.seen >= self.VIDEOS or last) and not self.labelled:
        raise self._unlabelled(step)
    if not self.warned and not labelled_B.all():
      self.warned = True
      logging.warning(
        "%d of the %d videos of the training batch for step %d have no labels (unlabelled "
        "test shards in data.train_pattern?); they train as negatives of every class",
        int((~labelled_B).sum()),
        len(labelled_B),
        step,
      )

  def may_save(self, step: int) -> bool:
    """Whether a periodic checkpoint may be saved: not while some process has seen only
    unlabelled videos, too few yet to decide (a corrected relaunch would resume from parameters
    trained towards all-zero labels). Agreed among processes: a save is collective."""
    if not self.cleared:
      ok = self.labelled > 0
      if jax.process_count() > 1:
        ok = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
      self.cleared = ok
      if not ok:
        logging.info("No checkpoint at step %d: no training video so far has a label", step)
    return self.cleared

  def _unlabelled(self, step: int) -> errors.DataError:
    data = self.config.data
    return errors.DataError(
      f"none of the {'first ' if self.seen >= self.VIDEOS else ''}{self.seen} training videos "
      f"(to step {step}) has a label: "
      f"data.train_pattern={data.train_pattern!r} looks unlabelled (test shards? "
      f"data.labels_feature={data.labels_feature!r})"
    )


def _check_inputs(config, checkpointer, state_shapes, init) -> input_pipeline.TrainFiles:
  """This process's train files, after checking them, its eval files, the checkpoint and the
  memory that the state (restored, or made by `init`), the input batches and the shuffle buffer
  need."""
  index, count = jax.process_index(), jax.process_count()
  with errors.about("data.train_pattern"):
    train_files = input_pipeline.TrainFiles(config.data.train_pattern, index, count)
  record = train_files.record_bytes  # Of the records the shuffle buffer will hold.
  with_eval = bool(config.data.eval_pattern)
  memory.check_state_and_inputs(config, state_shapes, "train", init, record, with_eval)
  checkpointer.check_compatible(state_shapes)
  if config.data.eval_pattern:
    with errors.about("data.eval_pattern"):
      eval_files = input_files.list_files(config.data.eval_pattern, index, count)
    evaluate.check_eval_files(config, eval_files)
  return train_files


def _train_and_evaluate(config, workdir: str, cleanup: contextlib.ExitStack) -> dict | None:
  train_cfg = config.train
  local_batch = train_cfg.batch_size // jax.process_count()  # Split evenly (_check_batches).
  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(config)
  state_shapes = train_lib.abstract_state(config, model, tx, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=train_cfg.keep_checkpoints, writer=True)
  cleanup.enter_context(checkpointer)
  # Before anything in the workdir is touched; if any process fails them, all stop.
  resuming = checkpointer.latest_step() is not None
  init = None if resuming else train_lib.state_initializer(config, model, tx, mesh)
  train_files = errors.agreed(lambda: _check_inputs(config, checkpointer, state_shapes, init))
  state = checkpointer.restore(state_shapes) if resuming else init()
  workdir_files.write_config(workdir, config)  # After the restore: a damaged step changes nothing.
  start_step = int(state.step)
  logging.info(
    "Training %s+%s+%s from step %d to %d on %d devices (%d processes); %d train files here",
    config.model.aggregator,
    config.model.fusion,
    config.model.classifier,
    start_step,
    train_cfg.num_steps,
    jax.device_count(),
    jax.process_count(),
    len(train_files.paths),
  )
  writer = event_writer.EventWriter(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(workdir_files.flat_hparams(config))

  train_fn = train_lib.jit_train_step(config, model, tx, mesh, state_shapes)
  eval_fn = train_lib.jit_eval_step(config, model, mesh, state_shapes)
  buffer, result = progress.MetricBuffer(), None
  batches, check_labels = None, LabelCheck(config)

  def run_eval(step: int) -> bool:
    """Evaluates the state at `step`; False where a stop request cut the evaluation short."""
    nonlocal result
    if not config.data.eval_pattern:
      logging.warning("data.eval_pattern is empty: skipping evaluation at step %d", step)
      return True
    try:
      res = evaluate.evaluate_split(
        config,
        state,
        eval_fn,
        mesh,
        config.data.eval_pattern,
        stop=signals.requested,
        check_memory=result is None,  # Its first evaluation in this run.
      )
    except evaluate.StoppedError:
      logging.warning("Evaluation at step %d given up; it runs first when training resumes", step)
      return False
    writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items()})
    logging.info("eval at step %d: %s", step, {k: round(float(v), 4) for k, v in res.items()})
    result = evaluate.write_results(workdir, step, res)
    return True

  def save(step: int) -> None:
    buffer.flush()  # Never save a state whose loss went NaN/Inf.
    checkpointer.save(state, step)

  if _evaluation_missed(config, workdir, start_step):
    logging.info("Evaluating step %d first: the run that saved it stopped before that", start_step)
    run_eval(start_step)

  rate, compiled = progress.StepRate(time.time(), start_step), set()
  # SIGTERM/Ctrl-C stops at once until the first step has run (nothing new to save yet); from
  # then on the loop saves after the running step and stops (mfb_jax/signals.py).
  with contextlib.ExitStack() as deferral:
    for step in range(start_step, train_cfg.num_steps):
      if batches is None:
        batches = train_files.batches(config, stream_seed(config, step), local_batch)
      local = next(batches)
      done = step + 1
      is_last = done == train_cfg.num_steps
      check_labels(local["labels"], done, is_last)
      global_batch = input_pipeline.to_global(local, mesh)
      # The parameter norms cost a pass over all parameters: only on steps that log metrics.
      with_norms = done % train_cfg.log_every == 0 or is_last
      compiling = with_norms not in compiled
      if compiling:  # Timed alone, so that the progress rates leave it out.
        jax.block_until_ready(state)
        began = time.time()
        memory.check_step(config, train_fn, (state, global_batch, with_norms), "train")
      state, step_metrics = train_fn(state, global_batch, with_norms)
      buffer.add(done, step_metrics)
      if compiling:
        jax.block_until_ready(step_metrics)
        rate.exclude(time.time() - began)
        compiled.add(with_norms)
      if step == start_step:
        deferral.enter_context(signals.deferred())
      stopping = _stop_agreed()

      if done % train_cfg.log_every == 0 or is_last or stopping:
        means = buffer.flush()
        steps_per_sec = rate(time.time(), done)
        means["steps_per_sec"] = steps_per_sec
        means["examples_per_sec"] = steps_per_sec * train_cfg.batch_size
        writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
        logging.info(
          progress.progress_line(
            done, train_cfg.num_steps, means["loss"], steps_per_sec, train_cfg.batch_size
          )
        )
      periodic = done % train_cfg.checkpoint_every == 0
      saved = is_last or stopping or (periodic and check_labels.may_save(done))
      if saved:  # Before the evaluation, which can be long.
        save(done)
      evaluated = True
      if done % train_cfg.eval_every == 0 or is_last:
        jax.block_until_ready(state)  # Its time is left out of the progress rates, as compiling is.
        eval_began = time.time()
        evaluated = run_eval(done)
        rate.exclude(time.time() - eval_began, steps=0)
      if not evaluated:
        stopping = True  # Every process gave up the evaluation at the same batch.
        if not saved:
          save(done)
      elif saved and not stopping and not is_last:
        # A signal during the save or a finished evaluation: `done` is saved, so stop here rather
        # than train one more step.
        stopping = _stop_agreed()
      if stopping:
        checkpointer.wait()  # A further signal is ignored until the save is complete.
        logging.warning("Stopped at step %d after a signal; checkpoint saved", done)
        break
    else:
      if start_step >= train_cfg.num_steps:
        logging.info("Already trained to step %d; evaluating", start_step)
        run_eval(start_step)
    checkpointer.wait()

  signals.work_done()  # Saved and evaluated: a signal from here on is ignored (exit code 0).
  writer.close()
  return result
