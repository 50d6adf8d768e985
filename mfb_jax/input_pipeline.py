"""tf.data input pipeline: YouTube-8M tfrecords (frame- or video-level) to numpy batches.

A batch is one process's share, a dict of numpy arrays: 'rgb' [B, T, D] and 'audio' [B, T, A]
(dequantized, in config.model.dtype: float32, or bfloat16 for bfloat16 models), 'mask' float32
[B, T] (1 = real frame), 'labels' float32 [B, C]
(multi-hot), 'valid' float32 [B] (0 = padding row of the last eval batch), 'id' object [B] of str.
Video-level records give T = 1. Bad data raises DataError with one line naming the file.
"""

import dataclasses
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mfb_jax import frame_batch, input_files, records, runtime, tf_errors, tfrecord_files
from mfb_jax.errors import DataError

# Train files read at once: batches mix videos from this many files (each file holds videos of
# all classes in random order, so this plus the record shuffle buffer is enough mixing).
TRAIN_CYCLE_LENGTH = 16
ID_BATCH = 256  # Records per parse call in read_ids_and_labels.

# Functions given to tf.data are traced as written: they branch on tensors with tf.cond only, so
# AutoGraph's rewriting of their Python source would only cost start-up time (1.4-1.9 s of a
# process's first train iterator, measured on a 2-core Xeon).
_as_written = tf.autograph.experimental.do_not_convert


def file_table(files: list[str], types: list[str] | None = None) -> tf.data.Dataset:
  """(path, compression type) of each file, in order."""
  types = input_files.compressions(files) if types is None else types
  return tf.data.Dataset.from_tensor_slices((files, types))


class TrainFiles:
  """This process's train files, listed, checked and their headers read once, before the state
  is restored or created: the run's stream (`batches`) then starts without touching the files
  again, which on thousands of remote (gs://) files saves minutes."""

  def __init__(self, pattern: str, process_index: int = 0, process_count: int = 1):
    self.pattern = pattern
    self.paths = input_files.list_files(pattern, process_index, process_count)
    self.record_bytes = input_files.require_records(self.paths, pattern)
    self.compressions = input_files.compressions(self.paths)

  def batches(self, config, seed: int, local_batch_size: int) -> Iterator[dict]:
    """Infinite shuffled batches; the same seed gives the same batches."""
    dataset, file_order = train_dataset(config, self, seed, local_batch_size)
    one_file, spec = _one_file(config, local_batch_size), records.RecordSpec.from_config(config)
    return tf_errors.checked_batches(dataset, file_order, one_file, spec=spec)


@_as_written
def _tagged_records(path: tf.Tensor, compression: tf.Tensor) -> tf.data.Dataset:
  """(file name, serialized record) pairs: the name goes into error messages."""
  records_ds = tf.data.TFRecordDataset(path, compression_type=compression)
  return records_ds.map(_as_written(lambda record: (path, record)))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from parallel map calls; intra-op threads on top only add contention
  # (measured on 2 cores).
  options.threading.max_intra_op_parallelism = 1
  return options


def _seeds(seed: int) -> list[int]:
  """Independent seeds for file order, record order and frame sampling."""
  return [int(s) for s in np.random.SeedSequence(int(seed) % 2**63).generate_state(3)]


def _batches(spec, records_ds, batch_size: int, drop_remainder: bool, frame_seed=None):
  """Batch dicts (with 'problem') from (name, record) pairs; short batches padded, valid = 0."""
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batch_calls = dict(num_parallel_calls=runtime.batch_calls(), deterministic=True)  # Bounded.
  if spec.format == "frame":  # Parsed a batch at a time (frame_batch.py).
    parse_batch = frame_batch.batch_parser(spec, batch_size, frame_seed is not None)
    if frame_seed is None:
      parse = parse_batch
    else:  # A per-record seed: the record's position in this (seeded, deterministic) stream.
      records_ds = records_ds.enumerate()
      seed = tf.constant(frame_seed, tf.int64)
      parse = lambda index_B, pair: parse_batch(
        *pair, tf.stack([tf.fill(tf.shape(index_B), seed), index_B], 1)
      )
    batched = records_ds.batch(batch_size, drop_remainder=drop_remainder)
    return batched.map(_as_written(parse), **batch_calls)
  # Video-level: each record's file and size travel with it, for tfrecord_files.FileEnds.
  parse = lambda name, record: {
    **records.parse_video_record(spec, name, record),
    "file": name,
    "bytes": tf.strings.length(record),
  }
  ds = records_ds.map(_as_written(parse), **parallel)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  finish = lambda batch: records.finish_batch(batch, batch_size, spec.feature_dtype)
  return ds.map(_as_written(finish), **batch_calls)


def train_dataset(config, train_files: TrainFiles, seed: int, local_batch_size: int):
  """(infinite tf.data.Dataset of batch dicts with 'problem', files in first-epoch order)."""
  spec = records.RecordSpec.from_config(config)
  data = config.data
  file_seed, record_seed, frame_seed = _seeds(seed)
  files = train_files.paths
  file_order = file_table(files, train_files.compressions)
  file_order = file_order.shuffle(len(files), seed=file_seed, reshuffle_each_iteration=True)
  ds = file_order.repeat().interleave(
    _tagged_records,
    cycle_length=min(len(files), TRAIN_CYCLE_LENGTH),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  if data.shuffle_buffer > 1:
    ds = ds.shuffle(data.shuffle_buffer, seed=record_seed)
  sample = spec.format == "frame" and data.random_frames
  ds = _batches(spec, ds, local_batch_size, True, frame_seed if sample else None)
  first_epoch = lambda: [p.decode() for p, _ in file_order.take(len(files)).as_numpy_iterator()]
  return ds.prefetch(data.prefetch_batches).with_options(_options()), first_epoch


def eval_dataset(
  config, files: list[str], local_batch_size: int, max_examples=0, types=None, check_labels=True
):
  """Every record once in file order; the last batch padded with valid = 0 rows (check_labels:
  False reads labels outside num_classes without an error, for predictions, which ignore them)."""
  spec = dataclasses.replace(records.RecordSpec.from_config(config), check_labels=check_labels)
  ds = file_table(files, types).flat_map(_tagged_records)
  if max_examples > 0:
    ds = ds.take(max_examples)
  ds = _batches(spec, ds, local_batch_size, drop_remainder=False)
  return ds.prefetch(config.data.prefetch_batches).with_options(_options())


def make_train_iterator(
  config: ml_collections.ConfigDict,
  pattern: str,
  seed: int,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Infinite shuffled batches of this process's files; the same seed gives the same batches."""
  return TrainFiles(pattern, process_index, process_count).batches(config, seed, local_batch_size)


def make_eval_iterator(
  config: ml_collections.ConfigDict,
  pattern: str,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  max_examples: int = 0,
  check_labels: bool = True,
  keep_files: bool = False,
) -> Iterator[dict]:
  """Each record of this process's files once, in order (max_examples > 0: only the first N);
  keep_files: each batch's 'file' holds each video's file."""
  files, types, file_ends = _read_once(pattern, process_index, process_count, max_examples <= 0)
  dataset = eval_dataset(config, files, local_batch_size, max_examples, types, check_labels)
  one_file = _one_file(config, local_batch_size, check_labels)
  spec = records.RecordSpec.from_config(config)
  return tf_errors.checked_batches(
    dataset, lambda: files, one_file, ends=file_ends, keep_files=keep_files, spec=spec
  )


def _read_once(pattern: str, process_index=0, process_count=1, last_whole=True):
  """(files, their compression types, the FileEnds check) for reading each file once, in order
  (last_whole: to the end of the last one)."""
  files, lengths = input_files.listed(pattern, process_index, process_count)
  types = input_files.compressions(files)
  return files, types, tfrecord_files.FileEnds(files, lengths, types, last_whole)


def _one_file(config, local_batch_size: int, check_labels=True) -> Callable[[str], tf.data.Dataset]:
  """The eval dataset of one file: to find which file a parse error without a name came from."""
  return lambda path: eval_dataset(config, [path], local_batch_size, check_labels=check_labels)


def empty_batch(config: ml_collections.ConfigDict, local_batch_size: int, num_frames: int) -> dict:
  """An all-padding batch (valid = 0) for processes that ran out of eval data."""
  data, B = config.data, local_batch_size
  dtype = records.feature_dtype(config).as_numpy_dtype
  return {
    "rgb": np.zeros((B, num_frames, data.rgb_size), dtype),
    "audio": np.zeros((B, num_frames, data.audio_size), dtype),
    "mask": np.zeros((B, num_frames), np.float32),
    "labels": np.zeros((B, data.num_classes), np.float32),
    "valid": np.zeros((B,), np.float32),
    "id": np.full((B,), "", dtype=object),
  }


def read_ids_and_labels(
  pattern: str,
  config: ml_collections.ConfigDict,
  classes_from: str = "data.num_classes",
  with_files: bool = False,
) -> Iterator[tuple]:
  """(video id, labels) of every record matching `pattern`, in file order (with_files: (video id,
  labels, file)); nothing else parsed. A label outside config.data.num_classes is a DataError
  naming `classes_from` as its source."""
  spec = records.RecordSpec.from_config(config)
  files, types, file_ends = _read_once(pattern)

  @_as_written
  def parse(names_B, serialized_B):
    context = records.parse_context(spec, serialized_B, names_B)
    labels = context[spec.labels_key]
    counts_B = tf.math.bincount(
      tf.cast(labels.indices[:, 0], tf.int32), minlength=tf.shape(names_B)[0], dtype=tf.int64
    )
    ids_B = records.video_ids(spec, context)
    sizes_B = tf.strings.length(serialized_B)
    out = {"id": ids_B, "labels": labels.values, "counts": counts_B}
    return {**out, "file": names_B, "bytes": sizes_B}

  ds = file_table(files, types).flat_map(_tagged_records).batch(ID_BATCH)
  ds = ds.map(parse, tf.data.AUTOTUNE, deterministic=True).prefetch(2).with_options(_options())
  batches = tf_errors.checked_batches(
    ds, lambda: files, decode_ids=False, ends=file_ends, keep_files=True
  )
  for batch in batches:
    ends = np.cumsum(batch["counts"])
    for file, video_id, labels in zip(
      batch["file"], batch["id"], np.split(batch["labels"], ends[:-1]), strict=True
    ):
      video_id = records.id_text(video_id)
      bad = labels[(labels < 0) | (labels >= spec.num_classes)]
      if bad.size:
        c = spec.num_classes
        raise DataError(
          f"{file}: video '{video_id}': label {bad[0]} is outside [0, {c}) ({classes_from}={c})"
        )
      yield (video_id, labels.tolist(), file) if with_files else (video_id, labels.tolist())


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded on the mesh axis 'data' from this process's batch ('id' dropped)."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k != "id"
  }
