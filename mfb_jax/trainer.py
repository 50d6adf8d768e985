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
  label_check,
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
    return _Run(config, workdir, cleanup).train()


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


def _check_inputs(config, checkpointer, state_shapes, init, step) -> input_pipeline.TrainFiles:
  """This process's train files, after checking them, its eval files, the checkpoint and the
  memory that the state (restored, or made by `init`), the input batches, the shuffle buffer,
  the train `step`'s temporaries and a checkpoint being saved need."""
  index, count = jax.process_index(), jax.process_count()
  with errors.about("data.train_pattern"):
    train_files = input_pipeline.TrainFiles(config.data.train_pattern, index, count)
  record = train_files.record_bytes  # Of the records the shuffle buffer will hold.
  checkpointer.check_compatible(state_shapes)
  if config.data.eval_pattern:
    with errors.about("data.eval_pattern"):
      eval_files = input_files.list_files(config.data.eval_pattern, index, count)
    evaluate.check_eval_files(config, eval_files)
  with_eval = bool(config.data.eval_pattern)
  # Last: the train step compiles in it.
  memory.check_state_and_inputs(
    config, state_shapes, "train", init, record, with_eval, step=step, saves=True
  )
  return train_files


class _Run:
  """One training run: its state, files and writers, and the named steps of its loop."""

  def __init__(self, config, workdir: str, cleanup: contextlib.ExitStack):
    self.config, self.workdir, self.train_cfg = config, workdir, config.train
    self.mesh = train_lib.make_mesh()
    model, tx = train_lib.build(config)
    state_shapes = train_lib.abstract_state(config, model, tx, self.mesh)
    keep = self.train_cfg.keep_checkpoints
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, keep, writer=True, config=config)
    cleanup.enter_context(self.checkpointer)
    # Before anything in the workdir is touched; if any process fails them, all stop.
    latest = self.checkpointer.latest_step()
    resuming = latest is not None
    init = None if resuming else train_lib.state_initializer(config, model, tx, self.mesh)
    self.train_fn = train_lib.jit_train_step(config, model, tx, self.mesh, state_shapes)
    # The variant with the parameter norms, whose temporaries are the larger; none where the run
    # is already trained (it only evaluates).
    step = None
    if not (resuming and latest >= self.train_cfg.num_steps):
      batch = train_lib.abstract_batch(config, self.train_cfg.batch_size, self.mesh)
      step = (self.train_fn, (state_shapes, batch, True))
    check = lambda: _check_inputs(config, self.checkpointer, state_shapes, init, step)
    self.train_files = errors.agreed(check)
    self.state = self.checkpointer.restore(state_shapes) if resuming else init()
    changed = workdir_files.changed_settings(workdir, config) if resuming else []
    if changed and jax.process_index() == 0:  # The new config.json will not say what it was.
      logging.warning(
        "resuming with settings changed since this workdir's last run: %s", ", ".join(changed)
      )
    # After the restore: a damaged step changes nothing.
    workdir_files.write_config(workdir, config)
    self.start_step = int(self.state.step)
    self._log_start()
    self.writer = event_writer.EventWriter(workdir, just_logging=jax.process_index() > 0)
    if self.start_step == 0:
      self.writer.write_hparams(workdir_files.flat_hparams(config))
    self.eval_fn = train_lib.jit_eval_step(config, model, self.mesh, state_shapes)
    self.buffer, self.result = progress.MetricBuffer(self._saved_state_gave), None
    self.batches, self.check_labels = None, label_check.LabelCheck(config)
    self.rate, self.compiled = None, set()  # The rate starts with the loop (train).

  def _log_start(self) -> None:
    config = self.config
    if self.start_step >= self.train_cfg.num_steps:
      return  # train() says so.
    logging.info(
      "Training %s+%s+%s from step %d to %d on %d devices (%d processes); %d train files here",
      config.model.aggregator,
      config.model.fusion,
      config.model.classifier,
      self.start_step,
      self.train_cfg.num_steps,
      jax.device_count(),
      jax.process_count(),
      len(self.train_files.paths),
    )

  def train(self) -> dict | None:
    """The loop: train, log, save, evaluate; stops after a signal with the step saved."""
    start, end = self.start_step, self.train_cfg.num_steps
    if _evaluation_missed(self.config, self.workdir, start):
      logging.info("Evaluating step %d first: the run that saved it stopped before that", start)
      self.evaluate(start)
    self.rate = progress.StepRate(time.time(), start)
    # SIGTERM/Ctrl-C stops at once until the first step has run (nothing new to save yet); from
    # then on the loop saves after the running step and stops (mfb_jax/signals.py).
    with contextlib.ExitStack() as deferral:
      for step in range(start, end):
        self.train_step(step)
        if step == start:
          deferral.enter_context(signals.deferred())
        done, stopping = step + 1, _stop_agreed()
        if done % self.train_cfg.log_every == 0 or done == end or stopping:
          self.log(done)
        if self.save_and_evaluate(done, stopping):
          self.checkpointer.wait()  # A further signal is ignored until the save is complete.
          logging.warning("Stopped at step %d after a signal; checkpoint saved", done)
          break
      else:
        if start >= end:
          logging.info("Already trained to step %d (train.num_steps=%d); evaluating", start, end)
          self.evaluate(start)
      self.checkpointer.wait()
    signals.work_done()  # Saved and evaluated: a signal from here on is ignored (exit code 0).
    self.writer.close()
    return self.result

  def train_step(self, step: int) -> None:
    """Reads the next batch and trains on it (a step that compiles is timed apart)."""
    config, done = self.config, step + 1
    if self.batches is None:
      seed = stream_seed(config, step)
      local_batch = self.train_cfg.batch_size // jax.process_count()  # Even (_check_batches).
      self.batches = self.train_files.batches(config, seed, local_batch)
    local = next(self.batches)
    is_last = done == self.train_cfg.num_steps
    self.check_labels(local["labels"], done, is_last)
    global_batch = input_pipeline.to_global(local, self.mesh)
    # The parameter norms cost a pass over all parameters: only on steps that log metrics.
    with_norms = done % self.train_cfg.log_every == 0 or is_last
    compiling = with_norms not in self.compiled
    if compiling:  # Timed alone, so that the progress rates leave it out.
      jax.block_until_ready(self.state)
      began = time.time()
      variant = "with the parameter norms (logged steps)" if with_norms else ""
      memory.check_step(
        config, self.train_fn, (self.state, global_batch, with_norms), "train", variant
      )
    self.state, step_metrics = self.train_fn(self.state, global_batch, with_norms)
    self.buffer.add(done, step_metrics)
    if compiling:
      jax.block_until_ready(step_metrics)
      self.rate.exclude(time.time() - began)
      self.compiled.add(with_norms)

  def log(self, done: int) -> None:
    """Writes the mean metrics since the last log, and a progress line."""
    means, batch_size = self.buffer.flush(), self.train_cfg.batch_size
    steps_per_sec = self.rate(time.time(), done)
    means["steps_per_sec"] = steps_per_sec
    means["examples_per_sec"] = steps_per_sec * batch_size
    self.writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
    total = self.train_cfg.num_steps
    logging.info(progress.progress_line(done, total, means["loss"], steps_per_sec, batch_size))

  def save_and_evaluate(self, done: int, stopping: bool) -> bool:
    """Saves and evaluates `done` where due; whether the run stops here (a signal came, or gave
    up the evaluation)."""
    train_cfg, is_last = self.train_cfg, done == self.train_cfg.num_steps
    periodic = done % train_cfg.checkpoint_every == 0
    saved = is_last or stopping or (periodic and self.check_labels.may_save(done))
    if saved:  # Before the evaluation, which can be long.
      self.save(done)
    if done % train_cfg.eval_every == 0 or is_last:
      # Its time is left out of the progress rates, as compiling is.
      jax.block_until_ready(self.state)
      began = time.time()
      evaluated = self.evaluate(done)
      self.rate.exclude(time.time() - began, steps=0)
      if not evaluated:  # Every process gave up the evaluation at the same batch.
        if not saved:
          self.save(done)
        return True
    if saved and not stopping and not is_last:
      # A signal during the save or a finished evaluation: `done` is saved, so stop here rather
      # than train one more step.
      return _stop_agreed()
    return stopping

  def save(self, step: int) -> None:
    self.buffer.flush()  # Never save a state whose loss went NaN/Inf, nor one that diverged.
    progress.check_state(self.state, self.mesh, step)
    self.checkpointer.save(self.state, step)

  def _saved_state_gave(self, step: int) -> str:
    """For a non-finite loss at `step`: the checkpoint of the state that gave it, where saved
    (a resume would start from it, and fail again)."""
    if step - 1 not in self.checkpointer.all_steps():
      return ""
    saved = f"{self.checkpointer.directory}/{step - 1}"
    return (
      f"; checkpoint {saved} holds the state that gave it: {self.checkpointer.move_aside(step - 1)}"
    )

  def evaluate(self, step: int) -> bool:
    """Evaluates the state at `step`; False where a stop request cut the evaluation short."""
    config = self.config
    if not config.data.eval_pattern:
      logging.warning("data.eval_pattern is empty: skipping evaluation at step %d", step)
      return True
    try:
      res = evaluate.evaluate_split(
        config,
        self.state,
        self.eval_fn,
        self.mesh,
        config.data.eval_pattern,
        stop=signals.requested,
        check_memory=self.result is None,  # Its first evaluation in this run.
      )
    except evaluate.StoppedError:
      logging.warning("Evaluation at step %d given up; it runs first when training resumes", step)
      return False
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items()})
    logging.info("eval at step %d: %s", step, {k: round(float(v), 4) for k, v in res.items()})
    self.result = evaluate.write_results(self.workdir, step, res)
    return True
