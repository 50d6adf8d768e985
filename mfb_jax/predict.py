"""Kaggle-format predictions (`--mode=predict`): every video's top-k labels, on one or many
processes; each process writes its share of the videos, process 0 merges them."""

import contextlib
import csv
import errno
import os
import secrets

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax import evaluate, input_pipeline, memory, signals, vocabulary, workdir_files
from mfb_jax import train as train_lib
from mfb_jax.errors import DataError

PREDICTIONS_FILE = "predictions.csv"
NAMED_PREDICTIONS_FILE = "predictions_named.csv"  # With predict.vocabulary: label names.


def run_predict(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=predict: the latest checkpoint's top-k labels for every video, as a Kaggle CSV."""
  mesh, model, abstract, state = evaluate.restore_for_inference(config, workdir)
  predict_fn = train_lib.jit_predict_step(config, model, mesh, abstract)
  pattern = config.data.predict_pattern or config.data.eval_pattern
  path = predict_split(config, state, predict_fn, mesh, pattern, workdir)
  # The predictions are written: a signal from here on is ignored, so that naming them (seconds
  # for a large split) is not cut short, leaving no named file and a rerun of the whole pass.
  signals.work_done()
  if config.predict.vocabulary and jax.process_index() == 0:
    named = os.path.join(workdir, NAMED_PREDICTIONS_FILE)
    vocabulary.name_predictions(path, config.predict.vocabulary, named)
    logging.info("wrote %s (label names from %s)", named, config.predict.vocabulary)
  return path


def _format_row(video_id: str, classes_K: np.ndarray, scores_K: np.ndarray) -> list[str]:
  pairs = " ".join(f"{int(c)} {s:.6f}" for c, s in zip(classes_K, scores_K, strict=True))
  return [video_id, pairs]


def predict_split(config, state, predict_fn, mesh, pattern: str, workdir: str) -> str:
  """Writes the top-k predictions of every video to WORKDIR/predictions.csv; returns its path.

  Each process writes its videos to a part file of this run's own (a second predict run on the
  workdir writes others), merged by process 0. A failed, stopped or empty pass leaves no part
  file of its process, and earlier predictions.csv and predictions_named.csv as they were; a
  pass that replaces predictions.csv removes the earlier named file (run_predict writes this
  pass's)."""
  token = _run_token()
  part = _part_path(workdir, token, jax.process_index())
  path = os.path.join(workdir, PREDICTIONS_FILE)
  try:
    written = _write_part(config, state, predict_fn, mesh, pattern, part)
    if jax.process_count() > 1:
      written = int(np.sum(multihost_utils.process_allgather(np.array([written]))))
    if written == 0:  # Every process agrees: no CSV of a header alone.
      raise DataError(f"no videos to predict: the files matching {pattern!r} hold no records")
    multihost_utils.sync_global_devices("predictions written")
    if jax.process_index() == 0:
      parts = [_part_path(workdir, token, i) for i in range(jax.process_count())]
      _merge_parts(path, parts, os.path.join(workdir, NAMED_PREDICTIONS_FILE))
    multihost_utils.sync_global_devices("predictions merged")
  except BaseException:  # A signal too (errors.Interrupted).
    with contextlib.suppress(Exception):
      if tf.io.gfile.exists(part):
        tf.io.gfile.remove(part)
    raise
  return path


def _run_token() -> str:
  """A name part of this predict run's own, the same on every process (process 0's)."""
  token = np.array(secrets.randbits(31), np.int32)
  if jax.process_count() > 1:
    token = multihost_utils.broadcast_one_to_all(token)
  return f"{int(token):08x}"


def _part_path(workdir: str, token: str, process: int) -> str:
  return os.path.join(workdir, f"{PREDICTIONS_FILE}.{token}.part-{process:05d}")


def _write_part(config, state, predict_fn, mesh, pattern: str, part: str) -> int:
  """This process's rows of the predictions CSV, written to `part`; returns how many. A write
  that fails (a full disk) is a WorkdirError naming the part file."""
  try:
    return _write_rows(config, state, predict_fn, mesh, pattern, part)
  except (tf.errors.OpError, OSError) as e:
    if part in str(e):  # The part file's own error, not a data file's.
      raise workdir_files.write_error(part, e) from e
    raise


def _write_rows(config, state, predict_fn, mesh, pattern: str, part: str) -> int:
  progress = evaluate.Progress("predicting")
  written = 0
  with tf.io.gfile.GFile(part, "w") as f:
    writer = csv.writer(f, lineterminator="\n")
    # Labels outside num_classes (another dataset version's) do not matter to predictions.
    source = "data.predict_pattern" if config.data.predict_pattern else "data.eval_pattern"
    batches = evaluate.local_batches(config, pattern, check_labels=False, source=source)
    for count, batch in enumerate(batches):
      global_batch = input_pipeline.to_global(batch, mesh)
      if count == 0:
        memory.check_step(config, predict_fn, (state, global_batch), "predict")
      scores, classes = predict_fn(state, global_batch)
      scores_BxK, classes_BxK = train_lib.local_rows(scores), train_lib.local_rows(classes)
      for i in np.flatnonzero(batch["valid"] > 0):
        if not batch["id"][i]:
          raise evaluate.no_id_error(pattern, config.data.id_feature)
        writer.writerow(_format_row(str(batch["id"][i]), classes_BxK[i], scores_BxK[i]))
        written += 1
      progress.update(int((batch["valid"] > 0).sum()))
  return written


def _merge_parts(path: str, parts: list[str], named: str) -> None:
  """PATH from the processes' part files under one header (then removed). The earlier named
  file goes once the new rows replace PATH: it names the CSV it came from, and none is better
  than one naming older rows. It is moved aside before the rename and back if that fails, so a
  merge that fails (a full disk, a rename refused) leaves both as they were."""
  aside = f"{named}.{os.getpid()}.old"
  moved, held = [], contextlib.ExitStack()

  def move_named_aside():  # Once the new rows are written and closed: a full disk has failed.
    # A signal from here until the named file is gone or back would stop between the steps.
    held.enter_context(signals.deferred())
    try:
      if tf.io.gfile.isdir(named):  # Not ours to remove; it would stand beside the new CSV.
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), named)
      if tf.io.gfile.exists(named):
        tf.io.gfile.rename(named, aside, overwrite=True)
        moved.append(aside)
    except (tf.errors.OpError, OSError) as e:
      raise workdir_files.write_error(named, e) from e

  with held:
    try:
      with workdir_files.atomic_file(path, before_rename=move_named_aside) as out:
        out.write("VideoId,LabelConfidencePairs\n")
        for part in parts:
          with tf.io.gfile.GFile(part) as f:
            out.write(f.read())
    except BaseException:
      if moved:
        with contextlib.suppress(Exception):
          tf.io.gfile.rename(aside, named, overwrite=True)
      raise
    if moved:
      tf.io.gfile.remove(aside)
  for part in parts:
    tf.io.gfile.remove(part)
