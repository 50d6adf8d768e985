"""Record spec, ids, labels, checks, video-level parsing and batch finishing (tf.data side).

Letters: B batch, T frames, C classes, D rgb size, A audio size, L labels of a video. Everything
here runs inside tf.data map functions: video-level records are parsed one by one, frame-level
ones a batch at a time (frame_batch.py, or one by one in frames.py), then each batch is finished
here (padded, dequantized). Checks that TensorFlow's parser does not make (feature sizes, frame
counts, label range) give each record a string 'problem' ('' when all is well); a batch carries
its first one, which input_pipeline raises as a DataError.
"""

import dataclasses

import ml_collections
import tensorflow as tf

from mfb_jax.errors import ConfigError
from mfb_jax.quantization import QUANT_OFFSET, QUANT_SCALE

AUTO_ID_KEYS = ("id", "video_id")  # 2018 data uses 'id', the 2017 (v1) data 'video_id'.
FORMATS = ("frame", "video")


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """What to read from a record, taken from config.data."""

  format: str
  num_classes: int
  max_frames: int  # Frames per output example: data.max_frames, or 1 for video-level data.
  id_keys: tuple[str, ...]
  labels_key: str
  rgb_key: str
  audio_key: str
  rgb_size: int
  audio_size: int
  feature_dtype: tf.DType = tf.float32  # Of the dequantized 'rgb' and 'audio' batches.
  check_labels: bool = True  # Labels outside num_classes are an error (not in predict mode).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RecordSpec":
    data = config.data
    if data.format not in FORMATS:
      raise ConfigError(f"config data.format={data.format!r}; allowed: {', '.join(FORMATS)}")
    if not data.id_feature:
      raise ConfigError("config data.id_feature is empty; use 'auto', 'id' or 'video_id'")
    for field in ("num_classes", "max_frames", "rgb_size", "audio_size"):
      if int(data[field]) < 1:
        raise ConfigError(f"config data.{field}={data[field]!r}; it must be a positive integer")
    frame = data.format == "frame"
    return cls(
      format=data.format,
      num_classes=int(data.num_classes),
      max_frames=int(data.max_frames) if frame else 1,
      id_keys=AUTO_ID_KEYS if data.id_feature == "auto" else (data.id_feature,),
      labels_key=data.labels_feature,
      rgb_key=data.rgb_feature if frame else data.video_rgb_feature,
      audio_key=data.audio_feature if frame else data.video_audio_feature,
      rgb_size=int(data.rgb_size),
      audio_size=int(data.audio_size),
      feature_dtype=feature_dtype(config),
    )


def feature_dtype(config: ml_collections.ConfigDict) -> tf.DType:
  """The dtype of the batches' features: config.model.dtype (one of config_checks.DTYPES;
  float32 where the config has no model). In bfloat16 a batch is half the memory, and the
  models' per-frame products read it without a conversion pass."""
  return tf.as_dtype(config.get("model", {}).get("dtype", "float32"))


def context_features(spec: RecordSpec) -> dict:
  """Parser spec of the per-video features: id key(s) and labels."""
  features = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in spec.id_keys}
  features[spec.labels_key] = tf.io.VarLenFeature(tf.int64)  # Absent in test shards: no labels.
  return features


def parse_context(spec: RecordSpec, serialized_B: tf.Tensor, names_B: tf.Tensor) -> dict:
  """Ids and labels only, of either format."""
  # Example.features and SequenceExample.context are both field 1 of type Features: one parser.
  context, _, _ = tf.io.parse_sequence_example(
    serialized_B, context_features=context_features(spec), example_names=names_B
  )
  return context


def video_ids(spec: RecordSpec, context: dict) -> tf.Tensor:
  """The id of each video: the first non-empty one of spec.id_keys."""
  ids_B = context[spec.id_keys[-1]]
  for key in reversed(spec.id_keys[:-1]):
    ids_B = tf.where(context[key] != "", context[key], ids_B)
  return ids_B


def id_text(raw: bytes) -> str:
  """A video id (or a line naming one) as text: its UTF-8, with any byte that is not UTF-8
  written as \\xNN. Ids that differ in such bytes stay distinct, in the duplicate checks and in
  a predictions CSV that the metrics CLI scores against the same files (only an id that spells
  out the same backslash-x text would read the same)."""
  return raw.decode("utf-8", "backslashreplace")


def multi_hot(spec: RecordSpec, values_L: tf.Tensor):
  """(labels_C in {0, 1}, (bad, why)) for one video's label ids."""
  in_range_L = (values_L >= 0) & (values_L < spec.num_classes)
  kept_L = tf.cast(tf.boolean_mask(values_L, in_range_L), tf.int32)
  counts_C = tf.math.bincount(kept_L, minlength=spec.num_classes, maxlength=spec.num_classes)
  bad_value = lambda: tf.boolean_mask(values_L, ~in_range_L)[0]
  c = spec.num_classes
  why = lambda: tf.strings.join(
    ["label ", tf.strings.as_string(bad_value()), f" is outside [0, {c}) (data.num_classes={c})"]
  )
  bad = ~tf.reduce_all(in_range_L) if spec.check_labels else tf.constant(False)
  return tf.cast(counts_C > 0, tf.float32), (bad, why)


def describe_problem(name, video_id, checks) -> tf.Tensor:
  """The line "NAME: video 'ID': WHY" of the first failing check, or ''; checks: (bad, why_fn).
  A record without an id reads "NAME: a record without an id: WHY" (bytes that are no record of
  this format read so: no id, no frames)."""

  def describe():
    why = tf.constant("")
    for bad, why_fn in reversed(checks):  # The first check listed wins.
      why = tf.cond(bad, why_fn, lambda why=why: why)
    named = tf.strings.join(["video '", video_id, "'"])
    video = tf.where(video_id == "", "a record without an id", named)
    return tf.strings.join([name, ": ", video, ": ", why])

  any_bad = tf.reduce_any(tf.stack([bad for bad, _ in checks]))
  return tf.cond(any_bad, describe, lambda: tf.constant(""))


def first_nonempty(strings_B: tf.Tensor) -> tf.Tensor:
  """The first non-empty string of a batch, or ''."""
  nonempty_B = strings_B != ""
  return tf.cond(
    tf.reduce_any(nonempty_B),
    lambda: tf.boolean_mask(strings_B, nonempty_B)[0],
    lambda: tf.constant(""),
  )


def pad_rows(x_B: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
  """x_B with `pad` zero (or '') rows appended; forwards x_B itself when pad == 0."""
  fill = "" if x_B.dtype == tf.string else 0
  return tf.pad(x_B, [[0, pad]] + [[0, 0]] * (x_B.shape.rank - 1), constant_values=fill)


@tf.function(jit_compile=True, autograph=False)
def dequantize(q_BxTxD: tf.Tensor, num_frames_B: tf.Tensor, dtype=tf.float32, skip=0) -> tf.Tensor:
  """q * 4/255 - 2 (computed in float32, stored as `dtype`) on real frames and 0 on padding, in
  one fused pass (XLA); the first `skip` bytes of each frame (frame_batch's headers) left out."""
  q_BxTxD = q_BxTxD[:, :, skip:]
  mask_BxT = tf.sequence_mask(num_frames_B, tf.shape(q_BxTxD)[1])
  values = tf.cast(q_BxTxD, tf.float32) * QUANT_SCALE + QUANT_OFFSET
  return tf.cast(tf.where(mask_BxT[:, :, None], values, 0.0), dtype)


def finish_batch(batch: dict, batch_size: int, dtype: tf.DType = tf.float32, skip=(0, 0)) -> dict:
  """The batch dict from parsed records: padded to batch_size rows (valid = 0), features
  dequantized (frame-level; the first skip[0] / skip[1] bytes of each rgb / audio frame left
  out) or cast (video-level) to `dtype`."""
  count = tf.shape(batch["num_frames"])[0]
  padded = {k: pad_rows(v, batch_size - count) for k, v in batch.items()}
  num_frames_B = padded["num_frames"]
  out = {
    "mask": tf.sequence_mask(num_frames_B, batch["rgb"].shape[1], tf.float32),
    "labels": padded["labels"],
    "valid": tf.cast(tf.range(batch_size) < count, tf.float32),
    "id": padded["id"],
    "problem": first_nonempty(padded["problem"]),
    "file": padded["file"],  # Each record's file and size (tfrecord_files.FileEnds).
    "bytes": padded["bytes"],
  }
  for key, width in zip(("rgb", "audio"), skip, strict=True):
    quantized = padded[key].dtype == tf.uint8  # Frame-level; video-level features are floats.
    out[key] = (
      dequantize(padded[key], num_frames_B, dtype, width)
      if quantized
      else tf.cast(padded[key], dtype)
    )
  return out


def _mean_feature(key: str, values_L: tf.Tensor, size: int, field: str):
  """(values [1, size], (bad, why_fn)) of a video-level float feature. NaN or infinite values
  are bad too: they would surface steps later as a NaN loss, blamed on the learning rate."""
  found = tf.size(values_L)
  finite = tf.reduce_all(tf.math.is_finite(values_L))

  def why():
    if_missing = f"no feature '{key}' (is this video-level data? see data.format)"
    wrong = [f"feature '{key}' has ", tf.strings.as_string(found), f" values, expected {size}"]
    wrong = tf.strings.join([*wrong, f" (data.{field})"])
    not_finite = f"feature '{key}' holds NaN or infinite values"
    return tf.where(found == 0, if_missing, tf.where(found != size, wrong, not_finite))

  values_D = tf.pad(values_L[:size], [[0, size - tf.minimum(found, size)]])
  return tf.reshape(values_D, [1, size]), ((found != size) | ~finite, why)


def parse_video_record(spec: RecordSpec, name, serialized) -> dict:
  """One video-level Example as float32 rgb [1, D], audio [1, A], labels [C], id and problem."""
  features = context_features(spec)
  features.update({k: tf.io.VarLenFeature(tf.float32) for k in (spec.rgb_key, spec.audio_key)})
  parsed = tf.io.parse_single_example(serialized, features, example_names=name)
  rgb_1xD, rgb_check = _mean_feature(
    spec.rgb_key, parsed[spec.rgb_key].values, spec.rgb_size, "rgb_size"
  )
  audio_1xA, audio_check = _mean_feature(
    spec.audio_key, parsed[spec.audio_key].values, spec.audio_size, "audio_size"
  )
  labels_C, label_check = multi_hot(spec, parsed[spec.labels_key].values)
  video_id = video_ids(spec, parsed)
  return {
    "rgb": rgb_1xD,
    "audio": audio_1xA,
    "num_frames": tf.constant(1, tf.int32),
    "labels": labels_C,
    "id": video_id,
    "problem": describe_problem(name, video_id, [rgb_check, audio_check, label_check]),
  }
