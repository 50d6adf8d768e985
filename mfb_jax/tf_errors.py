"""TensorFlow's errors while reading tfrecords, turned into one-line DataErrors naming the file.

tf.data reports a corrupt record or a bad feature without saying which of the interleaved files
it came from; these helpers find the file by reading the candidates one by one (only after an
error, so the normal path pays nothing) and strip TensorFlow's op annotations from the text.
"""

import re
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from mfb_jax import parse_errors, records, tfrecord_files
from mfb_jax.errors import DataError

_MAX_MESSAGE = 300  # TensorFlow's parse errors can quote a whole record.


def checked_batches(
  dataset: tf.data.Dataset,
  file_order: Callable[[], list[str]],
  one_file: Callable[[str], tf.data.Dataset] | None = None,
  decode_ids: bool = True,
  ends: tfrecord_files.FileEnds | None = None,
  keep_files: bool = False,
  spec: records.RecordSpec | None = None,
) -> Iterator[dict]:
  """Numpy batches; TensorFlow errors and bad records become one-line DataErrors. Each record's
  'file' and 'bytes' are taken out of the batches (keep_files: 'file' stays, the path as text,
  one string per file): `ends` checks them (files read in order). spec: the records are parsed
  whole by its format's per-record parser, which names the video of a parse error
  (parse_errors.first_failing_record)."""
  iterator = dataset.as_numpy_iterator()
  texts: dict[bytes, str] = {}  # keep_files: one string per file, however many videos name it.
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      if ends is not None:
        ends.finish()
      return
    except tf.errors.DataLossError as e:
      # Under interleave TensorFlow does not say which file; find it by reading them one by one.
      raise name_corrupt_file(file_order(), e) from e
    except tf.errors.OpError as e:
      text = message(e)
      path = ""
      unnamed = isinstance(e, tf.errors.InvalidArgumentError) and "Name: " not in text
      if unnamed and one_file is not None:  # Video-level parse errors name no file.
        path = first_failing(file_order(), one_file, text)
      typed = parse_errors.describe(text, path, _locator(spec, text))
      raise DataError(typed or (f"{path}: {text}" if path else f"bad record: {text}")) from e
    problem = batch.pop("problem", b"")
    if problem:
      raise DataError(records.id_text(problem))  # It names the video by its id.
    files_B, sizes_B = batch.pop("file"), batch.pop("bytes")
    if ends is not None:
      ends.add(files_B, sizes_B)
    if keep_files:
      text = lambda f: texts.get(f) or texts.setdefault(f, f.decode("utf-8", "replace"))
      batch["file"] = np.array([text(f) for f in files_B], dtype=object)
    if decode_ids:
      batch["id"] = np.array([records.id_text(i) for i in batch["id"]], dtype=object)
    yield batch


def _locator(spec: records.RecordSpec | None, text: str):
  """parse_errors.describe's locate(file) for the error `text` (None without a spec): the
  first record of the file whose own error is of its kind (another bad record of the file, of
  another kind, is not the one to name)."""
  if spec is None:
    return None

  def locate(file: str):
    same = lambda error: parse_errors.same_kind(message(error), text)
    return parse_errors.first_failing_record(spec, file, same)

  return locate


def first_failing(files: list[str], one_file: Callable, text: str) -> str:
  """The first of `files` whose own dataset fails with the error `text`, or ''."""
  logging.warning("bad record: reading %d file(s) one by one to name its file", len(files))
  for path in files:
    try:
      for _ in one_file(path):
        pass
    except tf.errors.OpError as e:
      if message(e) == text:
        return path
  return ""


def name_corrupt_file(files: list[str], error: tf.errors.OpError) -> DataError:
  logging.warning("corrupt tfrecord data: reading %d file(s) one by one to name it", len(files))
  for path in files:
    try:
      compression = tfrecord_files.compression_type(path)
      records_ds = tf.data.TFRecordDataset(path, compression_type=compression)
      records_ds.reduce(np.int64(0), lambda n, _: n + 1)
    except tf.errors.NotFoundError as e:  # Gone since it was listed.
      return unreadable(path, e)
    except tf.errors.DataLossError as e:
      return corrupt(path, compression, e)
  return DataError(f"corrupt or truncated tfrecord data ({message(error)})")


def unreadable(path: str, error: tf.errors.OpError) -> DataError:
  return DataError(f"{path}: cannot read tfrecord file ({message(error)})")


def corrupt(path: str, compression: str, error: tf.errors.OpError) -> DataError:
  kind = f"{compression}-compressed " if compression else ""
  return DataError(f"{path}: corrupt or truncated {kind}tfrecord file ({message(error)})")


def message(error: tf.errors.OpError) -> str:
  """TensorFlow's error text without its function-node and op annotations, on one line."""
  text = re.sub(r"\{\{[^}]*\}\}", "", error.message)
  text = re.sub(r"Error in user-defined function passed to .*? with iterator: [\w:]+: ", "", text)
  text = re.split(r"\[\[|\[Op:", text)[0]
  # TensorFlow's reader quotes only the end of what failed: "truncated record at 270917' failed
  # with Read less bytes than requested".
  text = text.replace("' failed with ", ": ")
  text = " ".join(text.split())
  return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."
