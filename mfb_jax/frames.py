"""Frame-level (2018 SequenceExample) parsing for the tf.data pipeline.

Letters: S frames stored in a record, T frames kept (data.max_frames), D rgb size, A audio size,
B batch, C classes. Each record is parsed by TensorFlow's parser, checked, decoded and cut or
padded to T frames as uint8 on its own; a whole batch is then dequantized in one fused pass, so
the float32 (or bfloat16) batch is written to memory once. frame_batch.py reads batches of
records laid out as the official writers lay them out without this parser, and sends any other
batch here: these checks are the ones that name a bad record.
"""

import tensorflow as tf

from mfb_jax import records
from mfb_jax.records import RecordSpec


def decode_frames(frames_S: tf.Tensor, bytes_S: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 [S, size] from per-frame byte strings (wrong-size frames are cut or zero-filled)."""
  # decode_raw without fixed_length is faster but needs every frame to have the same length.
  q = tf.cond(
    tf.reduce_all(bytes_S == size),
    lambda: tf.io.decode_raw(frames_S, tf.uint8),
    lambda: tf.io.decode_raw(frames_S, tf.uint8, fixed_length=size),
  )
  return tf.reshape(q, [-1, size])


def random_frame_indices(num_frames: tf.Tensor, keep: int, seed: tf.Tensor) -> tf.Tensor:
  """idx_T: `keep` distinct frame indices below num_frames (> keep), in increasing order."""
  scores_S = tf.random.stateless_uniform([num_frames], seed)
  return tf.sort(tf.math.top_k(scores_S, k=keep).indices)


def keep_frames(q_SxD: tf.Tensor, keep: int, idx_T=None) -> tf.Tensor:
  """uint8 [T, D]: frames idx_T if given, else the first `keep` frames, zero-padded."""
  if idx_T is not None:
    q_SxD = tf.gather(q_SxD, idx_T)
  q_SxD = q_SxD[:keep]
  return tf.pad(q_SxD, [[0, keep - tf.shape(q_SxD)[0]], [0, 0]])


def _size_check(key: str, bytes_S: tf.Tensor, size: int, field: str):
  """(bad, why_fn): some frame of feature `key` is not `size` bytes long."""
  wrong_S = bytes_S != size

  def why():
    found = tf.strings.as_string(tf.reduce_max(tf.boolean_mask(bytes_S, wrong_S)))
    text = [f"feature '{key}' has frames of ", found, f" bytes, expected {size} (data.{field})"]
    return tf.strings.join(text)

  return tf.reduce_any(wrong_S), why


def _count_checks(spec: RecordSpec, n_rgb: tf.Tensor, n_audio: tf.Tensor):
  """[(bad, why_fn)]: no frames at all; rgb and audio frame counts differ."""
  rgb, audio = spec.rgb_key, spec.audio_key
  n = lambda count: tf.strings.as_string(count)

  def counts():
    differ = tf.strings.join([f"'{rgb}' has ", n(n_rgb), f" frames but '{audio}' has ", n(n_audio)])
    missing = f"no '{audio}' frames while '{rgb}' has "
    missing = tf.strings.join([missing, n(n_rgb), " (is data.audio_feature its name?)"])
    return tf.where(n_audio == 0, missing, differ)

  empty = (
    f"no '{rgb}' frames (a video without frames, or no frame-level data: see data.format and "
    "data.rgb_feature)"
  )
  return [(n_rgb == 0, lambda: tf.constant(empty)), (n_rgb != n_audio, counts)]


def parse_frame_record(spec: RecordSpec, name, serialized, seed=None) -> dict:
  """One record as uint8 rgb [T, D], audio [T, A], num_frames, labels [C], id and problem.

  seed (shape [2]): keep an ordered random subset of T frames of a longer video (training).
  """
  rgb, audio, keep = spec.rgb_key, spec.audio_key, spec.max_frames
  # allow_missing: a record without frames is reported by our own check, with its video id.
  sequence = {
    k: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True) for k in (rgb, audio)
  }
  context, frames = tf.io.parse_single_sequence_example(
    serialized, records.context_features(spec), sequence, example_name=name
  )
  n_rgb, n_audio = tf.shape(frames[rgb])[0], tf.shape(frames[audio])[0]
  rgb_bytes_S, audio_bytes_S = tf.strings.length(frames[rgb]), tf.strings.length(frames[audio])
  labels_C, label_check = records.multi_hot(spec, context[spec.labels_key].values)
  checks = [
    *_count_checks(spec, n_rgb, n_audio),
    _size_check(rgb, rgb_bytes_S, spec.rgb_size, "rgb_size"),
    _size_check(audio, audio_bytes_S, spec.audio_size, "audio_size"),
    label_check,
  ]
  video_id = records.video_ids(spec, context)
  q_rgb = decode_frames(frames[rgb], rgb_bytes_S, spec.rgb_size)
  q_audio = decode_frames(frames[audio], audio_bytes_S, spec.audio_size)
  if seed is None:
    q_rgb, q_audio = keep_frames(q_rgb, keep), keep_frames(q_audio, keep)
  else:

    def sample():
      idx_T = random_frame_indices(n_rgb, keep, seed)
      return keep_frames(q_rgb, keep, idx_T), keep_frames(q_audio, keep, idx_T)

    # Sampling needs equal rgb and audio lengths; a record without them is reported as bad.
    q_rgb, q_audio = tf.cond(
      (n_rgb > keep) & (n_rgb == n_audio),
      sample,
      lambda: (keep_frames(q_rgb, keep), keep_frames(q_audio, keep)),
    )
  return {
    "rgb": tf.ensure_shape(q_rgb, [keep, spec.rgb_size]),
    "audio": tf.ensure_shape(q_audio, [keep, spec.audio_size]),
    "num_frames": tf.minimum(n_rgb, keep),  # int32
    "labels": labels_C,
    "id": video_id,
    "problem": records.describe_problem(name, video_id, checks),
  }
