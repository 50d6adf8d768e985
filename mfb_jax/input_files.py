"""Which tfrecord files a process reads, checked before any is read: globs listed, each
process's share, directories, empty and truncated files, compression, and a first record.

Each problem raises DataError with one line naming the file and the pattern.
"""

import os

import tensorflow as tf
from absl import logging

from mfb_jax import file_patterns, tf_errors, tfrecord_files
from mfb_jax.errors import DataError


def list_files(pattern: str, process_index: int = 0, process_count: int = 1) -> list[str]:
  """This process's share of the files matching comma-separated globs (file_patterns.split;
  sorted, then strided)."""
  return listed(pattern, process_index, process_count)[0]


def listed(pattern: str, process_index: int, process_count: int) -> tuple[list[str], list[int]]:
  """list_files(...) and the files' lengths in bytes."""
  globs = file_patterns.split(pattern)
  if not globs:
    raise DataError(f"empty file pattern {pattern!r}: give one or more comma-separated globs")
  files = set()
  for glob in globs:
    try:
      matched = globbed(glob)
    except tf.errors.OpError as e:
      raise DataError(f"cannot list files matching {glob!r}: {tf_errors.message(e)}") from e
    if not matched:
      raise DataError(f"no file matches {glob!r}{tfrecord_files.unreadable_directory(glob)}")
    files.update(matched)
  files = tfrecord_files.without_aliases(sorted(files))
  mine = files[process_index::process_count]
  if not mine:
    raise DataError(
      f"process {process_index} of {process_count} gets no files: {pattern!r} matches "
      f"{len(files)} file(s); use at least as many files as processes"
    )
  lengths = file_lengths(mine)
  for path, length in zip(mine, lengths, strict=True):
    if length is None:
      raise DataError(f"{path} is a directory, not a tfrecord file (pattern {pattern!r})")
    if length == 0:
      raise DataError(f"{path} is empty (0 bytes)")
    if length < tfrecord_files.RECORD_FRAMING_BYTES and _uncompressed(path):
      raise DataError(  # TensorFlow reads it as holding no record. (An empty ZLIB file: 8 bytes.)
        f"{path} is no tfrecord file: {length} bytes, fewer than one record takes "
        f"({tfrecord_files.RECORD_FRAMING_BYTES} or more)"
      )
  return mine, lengths


def globbed(glob: str) -> list[str]:
  """tf.io.gfile.glob, with a local path's leading '~' expanded (a shell leaves the one in
  `--config.data.train_pattern=~/yt8m/train*` as it is)."""
  return tf.io.gfile.glob(glob if "://" in glob else os.path.expanduser(glob))


def file_lengths(files: list[str]) -> list[int | None]:
  """Each file's length in bytes (None for a directory), read concurrently."""
  stats = tfrecord_files.map_paths(_stat, files)
  return [None if stat.is_directory else int(stat.length) for stat in stats]


def _uncompressed(path: str) -> bool:
  try:
    return tfrecord_files.compression_type(path) == tfrecord_files.NONE
  except tf.errors.OpError as e:
    raise tf_errors.unreadable(path, e) from e


def _stat(path: str):
  try:
    return tf.io.gfile.stat(path)
  except tf.errors.OpError as e:  # A dangling symlink, or a file gone since the listing.
    raise tf_errors.unreadable(path, e) from e


def require_records(files: list[str], pattern: str, sample: int = 32) -> int:
  """The mean serialized size of the first (up to `sample`) records of the first file that
  holds one: what the training shuffle buffer holds per record (memory.check_state_and_inputs).
  Raises DataError unless some file holds a record: training repeats its files forever, so files
  without a single record would otherwise leave it waiting for a first batch for ever."""
  for path in files:
    compression, sizes = "", []
    try:
      compression = tfrecord_files.compression_type(path)
      records = tf.data.TFRecordDataset(path, compression_type=compression).take(sample)
      for record in records:
        sizes.append(len(record.numpy()))
    except tf.errors.DataLossError as e:
      if not sizes:  # Damage past the first record is the training reader's to report.
        raise tf_errors.corrupt(path, compression, e) from e
    except tf.errors.OpError as e:
      raise tf_errors.unreadable(path, e) from e
    if sizes:
      return sum(sizes) // len(sizes)
  raise DataError(
    f"no records in the {len(files)} file(s) matching {pattern!r} (e.g. {files[0]}): "
    "training needs at least one video"
  )


def compressions(files: list[str]) -> list[str]:
  """The compression type of each file, in order: GZIP and ZLIB files are read as such."""
  try:
    found = tfrecord_files.compression_types(files)
  except tf.errors.OpError as e:
    raise DataError(f"cannot read tfrecord file: {tf_errors.message(e)}") from e
  compressed = sum(c != tfrecord_files.NONE for c in found)
  if compressed:
    logging.info("%d of %d file(s) are GZIP or ZLIB compressed", compressed, len(files))
  return found
