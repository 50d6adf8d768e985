"""Evaluation over a whole split, on one or many processes (prediction: mfb_jax/predict.py).

Every video is seen exactly once: each process reads its own files, the last batch is padded and
masked, and processes that run out of data early feed all-padding batches until every process is
done, so all of them run the same number of (collective) steps.
"""

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax import (
  config_checks,
  errors,
  input_pipeline,
  memory,
  metrics,
  records,
  tf_errors,
  workdir_files,
)
from mfb_jax import train as train_lib
from mfb_jax.errors import DataError, UnlabelledError

RESULTS_FILE = "eval_results.json"
HISTORY_FILE = "eval_history.jsonl"  # One line per evaluation, for GAP-vs-step curves.


class StoppedError(Exception):
  """An evaluation given up at a stop request (a signal during training), on every process."""


def lockstep(
  batches: Iterator[dict], empty: dict, stop: Callable[[], bool] = lambda: False
) -> Iterator[dict]:
  """Yields local batches until every process is exhausted, padding the finished ones.

  Raises StoppedError, on every process at the same batch, once stop() is true on any of them.
  """
  iterator = iter(batches)
  while True:
    batch = next(iterator, None)
    has_data, stopping = batch is not None, stop()
    if jax.process_count() > 1:
      either = multihost_utils.process_allgather(np.array([has_data, stopping]))
      has_data, stopping = (bool(x) for x in np.any(either.reshape(-1, 2), axis=0))
    if stopping:
      raise StoppedError()
    if not has_data:
      return
    yield batch if batch is not None else empty


def local_batches(
  config,
  pattern: str,
  max_examples: int = 0,
  stop=lambda: False,
  check_labels: bool = True,
  source: str = "data.eval_pattern",
) -> Iterator[dict]:
  """This process's share of the videos matched by `pattern` (from `source`, which the listing's
  errors name), in lockstep batches across processes, each video once."""
  local_batch = config_checks.check_batch_split(
    config.eval.batch_size, "eval.batch_size", jax.process_count(), jax.device_count()
  )
  # Its files are listed and checked now: if one process fails, all stop.
  with errors.about(source):
    batches = errors.agreed(
      lambda: input_pipeline.make_eval_iterator(
        config,
        pattern,
        local_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_examples=max_examples,
        check_labels=check_labels,
        keep_files=True,  # For _unique_ids, which takes them out.
      )
    )
  empty = input_pipeline.empty_batch(config, local_batch, train_lib.frames_per_example(config))
  seen: dict[str, str] = {}
  unique = lockstep(_unique_ids(batches, pattern, config.data.id_feature, seen), empty, stop)
  return _then_unique_across_processes(unique, seen, pattern)


def _then_unique_across_processes(batches: Iterator[dict], seen: dict[str, str], pattern: str):
  """The batches; then, in a multi-process run, a DataError on every process where two of them
  read a video of the same id (each checks only its own files while it reads them)."""
  yield from batches
  if jax.process_count() > 1:
    errors.agreed(lambda: _no_id_in_two_processes(seen, pattern))


def _no_id_in_two_processes(seen: dict[str, str], pattern: str) -> None:
  """Gathers 8-byte digests of every process's video ids (about 8 MB a million videos) and
  raises DataError where one of this process's ids is another process's too."""
  ids = sorted(seen)
  # Gathered as uint8 (without jax_enable_x64, JAX would cut uint64 to 32 bits), compared as one
  # uint64 each.
  mine_Nx8 = np.array([workdir_files.digest(i.encode()) for i in ids], np.uint8).reshape(-1, 8)
  counts = np.asarray(multihost_utils.process_allgather(np.int32(len(ids)))).reshape(-1)
  padded = np.zeros((int(counts.max()), 8), np.uint8)
  padded[: len(ids)] = mine_Nx8
  every_PxNx8 = np.asarray(multihost_utils.process_allgather(padded))
  as_int = lambda x_Nx8: np.ascontiguousarray(x_Nx8).view(np.uint64).reshape(-1)
  mine = as_int(mine_Nx8)
  for process, count in enumerate(counts):
    if process == jax.process_index():
      continue
    shared = np.flatnonzero(np.isin(mine, as_int(every_PxNx8[process, :count])))
    if shared.size:
      video_id = ids[shared[0]]
      raise DataError(
        f"video id {video_id!r} appears in the files of process {jax.process_index()} (in "
        f"{seen[video_id]}) and of process {process} (the same videos in two files matching "
        f"{pattern!r}?)"
      )


def no_id_error(pattern: str, id_feature: str) -> DataError:
  return DataError(
    f"a video in {pattern!r} has no id (data.id_feature={id_feature!r}; 'auto' reads 'id', "
    "else 'video_id')"
  )


def _unique_ids(
  batches: Iterator[dict], pattern: str, id_feature: str, seen: dict[str, str]
) -> Iterator[dict]:
  """The batches, without their 'file'; a video id met twice (in this process's files) is a
  DataError naming the file(s): GAP would count that video twice, and a predictions CSV with it
  is one that the metrics CLI refuses. Videos without an id pass with data.id_feature='auto'
  (evaluation does not need them; predict refuses them); with a feature named, a video without
  it is a DataError (a misspelled name turned the duplicate check off). `seen` gathers the ids,
  each with its file."""
  for batch in batches:
    valid_B = batch["valid"] > 0
    for video_id, file in zip(batch["id"][valid_B], batch.pop("file")[valid_B], strict=True):
      if video_id in seen:
        where = (
          f"twice in {file} (a video written twice?)"
          if seen[video_id] == file
          else f"in {seen[video_id]} and in {file} (the same videos in two files?)"
        )
        raise DataError(f"video id {video_id!r} of the files matching {pattern!r} appears {where}")
      if not video_id and id_feature != "auto":
        raise no_id_error(pattern, id_feature)
      if video_id:
        seen[video_id] = file
    yield batch


class Progress:
  """Progress lines with rate and elapsed time for long passes over a split."""

  def __init__(self, what: str, every_seconds: float = 30.0):
    self.what, self.every = what, every_seconds
    self.start = self.last = time.time()
    self.count = 0

  def update(self, num_examples: int) -> None:
    self.count += num_examples
    now = time.time()
    if now - self.last >= self.every:
      self.last = now
      rate = self.count / max(now - self.start, 1e-9)
      logging.info("%s: %d videos, %.0f videos/s", self.what, self.count, rate)

  def done(self) -> float:
    return time.time() - self.start


def _max_examples_here(config) -> int:
  """This process's share of eval.max_examples, which counts videos over all processes (0: all)."""
  return -(-config.eval.max_examples // jax.process_count())


def evaluate_split(
  config, state, eval_fn, mesh, pattern: str, stop=lambda: False, check_memory: bool = True
) -> dict:
  """Metrics of `state` over every video matched by `pattern` (GAP as a fraction); with
  `check_memory`, eval_fn's memory needs are checked before its first batch (memory.check_step).

  `stop()` is asked before every batch: once it is true on any process, every process raises
  StoppedError (the training loop's evaluations give up at a signal instead of finishing the split).
  """
  accumulator = metrics.MetricsAccumulator(config.data.num_classes, config.eval.top_k)
  progress = Progress("evaluating")
  batches = local_batches(config, pattern, _max_examples_here(config), stop)
  for count, batch in enumerate(batches):
    global_batch = input_pipeline.to_global(batch, mesh)
    if count == 0 and check_memory:
      memory.check_step(config, eval_fn, (state, global_batch), "eval")
    summary = jax.device_get(eval_fn(state, global_batch))
    valid = summary.pop("valid")
    accumulator.add(summary, valid)
    progress.update(int(valid.sum()))
  try:
    result = accumulator.result()
  except DataError as e:  # No videos, or none with a label: name the split.
    key = f" (labels read from data.labels_feature={config.data.labels_feature!r})"
    raise DataError(f"{pattern}: {e}{key if isinstance(e, UnlabelledError) else ''}") from e
  logging.info(
    "evaluated %d videos in %.1fs: GAP@%d %.4f",
    result["num_examples"],
    progress.done(),
    config.eval.top_k,
    result["gap"],
  )
  return result


def check_eval_files(config, paths: list[str], count: int = 16) -> None:
  """At a training run's start, the first `count` videos of this process's eval files (in file
  order, past files without a record) through the eval pipeline's checks: another format, feature
  sizes, labels beyond num_classes or videos without the named data.id_feature raise the
  DataError that the first evaluation, hours later, would; so does, in a one-process run, a split
  without any video. Warns when none has labels (test shards?): that evaluation would stop the
  run."""
  if config.eval.max_examples > 0:  # Only the videos the evaluation will read.
    count = min(count, _max_examples_here(config))
  # One dataset over the files (a pipeline per file took 0.4 s each: minutes for empty shards).
  first = lambda files: input_pipeline.eval_dataset(config, files, count, max_examples=count)
  labelled, read = [], {}  # read: the files of the videos read, in order.
  batches = tf_errors.checked_batches(
    first(paths),
    lambda: paths,
    lambda path: first([path]),
    decode_ids=False,
    keep_files=True,
    spec=records.RecordSpec.from_config(config),
  )
  for batch in batches:
    valid_B = batch["valid"] > 0
    files_B = batch["file"][valid_B]
    read.update(dict.fromkeys(files_B))
    no_id_B = batch["id"][valid_B] == b""
    if config.data.id_feature != "auto" and no_id_B.any():  # As _unique_ids would at evaluation.
      raise no_id_error(files_B[no_id_B][0], config.data.id_feature)
    labelled.extend(batch["labels"][valid_B].any(axis=1))
  if not labelled and jax.process_count() == 1:
    files = paths[0] if len(paths) == 1 else f"{len(paths)} files, {paths[0]} first"
    raise DataError(f"data.eval_pattern: no videos to evaluate: no record in its {files}")
  if labelled and not any(labelled):
    logging.warning(
      "data.eval_pattern: the first %d videos, in %s, have no labels (test shards?); the "
      "first evaluation will stop the run, since GAP needs labelled videos",
      len(labelled),
      ", ".join(read),
    )


def write_results(workdir: str, step: int, result: dict) -> dict:
  """Writes eval_results.json (the contract's keys) atomically and appends eval_history.jsonl."""
  record = {"step": int(step), "num_examples": int(result["num_examples"])}
  record.update({k: float(result[k]) for k in ("gap", "map", "hit_at_1", "perr")})
  if jax.process_index() == 0:
    workdir_files.write_text(os.path.join(workdir, RESULTS_FILE), json.dumps(record, indent=2))
    workdir_files.append_line(os.path.join(workdir, HISTORY_FILE), json.dumps(record))
  return record


def evaluated_steps(workdir: str) -> set[int]:
  """The steps eval_history.jsonl has a result for (a line cut short by a kill, or otherwise
  unreadable, is skipped)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not tf.io.gfile.exists(path):
    return set()
  steps = set()
  with tf.io.gfile.GFile(path, "rb") as f:
    text = f.read().decode("utf-8", "replace")
  for line in text.splitlines():  # Lines that are not a result (damaged, edited) are skipped.
    with contextlib.suppress(ValueError, KeyError, TypeError, OverflowError):
      steps.add(int(json.loads(line)["step"]))
  return steps


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
  """(mesh, model, abstract state, restored state) of the workdir's latest checkpoint."""
  from mfb_jax import checkpoint as checkpoint_lib

  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(config)
  abstract = train_lib.abstract_state(config, model, tx, mesh)
  errors.agreed(lambda: memory.check_state_and_inputs(config, abstract, "eval"))
  # Closed after a failed restore too: no orbax thread left to print tracebacks at exit.
  with checkpoint_lib.Checkpointer(workdir, config=config) as checkpointer:
    state = checkpointer.restore(abstract)
  changed = workdir_files.inference_changes(workdir, config)  # After the restore's own line.
  if changed and jax.process_index() == 0:
    logging.warning("settings differ from this workdir's training run: %s", ", ".join(changed))
  return mesh, model, abstract, state


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: the latest checkpoint over the whole eval split; writes eval_results.json."""
  mesh, model, abstract, state = restore_for_inference(config, workdir)
  eval_fn = train_lib.jit_eval_step(config, model, mesh, abstract)
  result = evaluate_split(config, state, eval_fn, mesh, config.data.eval_pattern)
  return write_results(workdir, int(state.step), result)
