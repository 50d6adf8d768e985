"""Frame-level records parsed a batch at a time, by their byte layout (the fast path).

Letters: B batch, T frames kept (data.max_frames), S frames stored, D feature size, F bytes a
frame takes in a record (its header H plus D), C classes, R frames past the T kept.

TensorFlow's SequenceExample parser copies each of a video's 600 frames into a string of its own
(a heap allocation each), which decode_raw then copies again. A record as the official writers
lay it out holds each feature's frames as one run of F-byte pieces (a fixed header, then the D
bytes), so here both runs are found from a few varints per record, vectorized over the batch
(frame_layout.py), and each is cut out of the record in one piece; the headers stay in the batch
until the dequantize, which skips them (records.finish_batch). Ids and labels still come from
TensorFlow's parser. A batch with a record laid out any other way (fields in another order, extra
feature lists, frames of other sizes or encodings, no frames, labels outside num_classes) goes
through frames.py's per-record parser, whose checks name the problem: both give the same batches.
Measured on a 2-core AMD Zen 5 (BENCHMARKS.md, "Frame-level records read by their layout"): 38-41
against 55-59 core-ms of CPU per batch of 128 300-frame videos.
"""

import functools

import tensorflow as tf

from mfb_jax import frame_layout, frames, records
from mfb_jax.records import RecordSpec

_LONGEST = 4  # Videos of up to this many times data.max_frames take the fast path.


def _decoded(records_B, start_B, size_B, frame_bytes: int, frames=None) -> tf.Tensor:
  """uint8 [B, S, F]: each record's run (at most `frames` frames of it), zero-filled to the
  longest (or to `frames`)."""
  if frames is not None:
    size_B = tf.minimum(size_B, frames * frame_bytes)
    length = frames * frame_bytes
  else:
    length = tf.cast(tf.maximum(tf.reduce_max(size_B), frame_bytes), tf.int32)
  piece_B = frame_layout.piece(records_B, start_B, size_B)
  # Without fixed_length decode_raw skips zero-filling its output, but needs equal lengths.
  full = tf.reduce_all(tf.cast(size_B, tf.int32) == length) & (tf.size(size_B) > 0)
  q_BxSF = tf.cond(
    full,
    lambda: tf.io.decode_raw(piece_B, tf.uint8),
    lambda: tf.io.decode_raw(piece_B, tf.uint8, fixed_length=length),
  )
  return tf.reshape(q_BxSF, [tf.shape(q_BxSF)[0], frames or -1, frame_bytes])


def _headers_ok(q_BxSxF: tf.Tensor, real_B: tf.Tensor, header: list[int]) -> tf.Tensor:
  """Whether each of the first real_B frames of each row starts with `header`."""
  real_BxS = tf.sequence_mask(real_B, tf.shape(q_BxSxF)[1])[:, :, None]
  same_BxSxH = q_BxSxF[:, :, : len(header)] == tf.constant(header, tf.uint8)
  return tf.reduce_all(same_BxSxH | ~real_BxS)


# For the kept frames, whose shape is fixed: one fused pass (XLA) over the headers, where
# TensorFlow's strided slice and broadcasts took 5% of the pipeline's CPU. (The other checks
# see a new shape in nearly every batch, which XLA would compile again each time.)
_kept_headers_ok = tf.function(_headers_ok, jit_compile=True, autograph=False)


def _run(records_B, start_B, size_B, stored_B, header, size: int, keep: int, idx_BxT=None):
  """(uint8 [B, T, F]: each record's first T frames, or its frames idx_BxT, zeros past its own;
  whether every stored frame has the canonical header, the ones not kept too)."""
  frame_bytes = len(header) + size
  if idx_BxT is not None:
    q_BxSxF = _decoded(records_B, start_B, size_B, frame_bytes)
    idx_BxT = tf.minimum(idx_BxT, tf.shape(q_BxSxF)[1] - 1)
    return tf.gather(q_BxSxF, idx_BxT, batch_dims=1), _headers_ok(q_BxSxF, stored_B, header)
  q_BxTxF = _decoded(records_B, start_B, size_B, frame_bytes, keep)
  ok = _kept_headers_ok(q_BxTxF, tf.minimum(stored_B, keep), header)

  def tail_ok():  # Frames past the T kept are checked, not decoded into the batch.
    start = start_B + keep * frame_bytes
    q_BxRxF = _decoded(records_B, start, tf.maximum(size_B - keep * frame_bytes, 0), frame_bytes)
    return _headers_ok(q_BxRxF, tf.maximum(stored_B - keep, 0), header)

  return q_BxTxF, ok & tf.cond(tf.reduce_any(stored_B > keep), tail_ok, lambda: True)


def _sampled_indices(num_frames_B: tf.Tensor, seeds_Bx2: tf.Tensor, keep: int) -> tf.Tensor:
  """int32 [B, T]: frames.random_frame_indices for videos longer than T, else 0..T-1."""

  @tf.autograph.experimental.do_not_convert
  def one(args):
    n, seed = args
    sample = lambda: frames.random_frame_indices(n, keep, seed)
    return tf.cond(n > keep, sample, lambda: tf.range(keep))

  signature = tf.TensorSpec([keep], tf.int32)
  return tf.map_fn(one, (num_frames_B, seeds_Bx2), fn_output_signature=signature)


def _multi_hot(labels, rows: tf.Tensor, num_classes: int):
  """(float32 [B, C] from a SparseTensor of label ids, ids outside [0, C) left out; whether
  every id is inside)."""
  values_N, row_N = labels.values, labels.indices[:, 0]
  kept_N = (values_N >= 0) & (values_N < num_classes)
  at_Nx2 = tf.stack([tf.boolean_mask(row_N, kept_N), tf.boolean_mask(values_N, kept_N)], 1)
  zeros_BxC = tf.zeros(tf.stack([rows, num_classes]), tf.float32)
  ones_N = tf.ones(tf.shape(at_Nx2)[:1], tf.float32)
  return tf.tensor_scatter_nd_max(zeros_BxC, at_Nx2, ones_N), tf.reduce_all(kept_N)


def _per_record(spec: RecordSpec, names_B, records_B, seeds_Bx2) -> dict:
  """frames.parse_frame_record on each record (the batch's own checks and problem lines)."""
  sample = seeds_Bx2 is not None
  seeds_Bx2 = seeds_Bx2 if sample else tf.zeros([tf.shape(records_B)[0], 2], tf.int64)

  @tf.autograph.experimental.do_not_convert  # Traced as written (input_pipeline._as_written).
  def one(args):
    name, record, seed = args
    return frames.parse_frame_record(spec, name, record, seed if sample else None)

  string = tf.TensorSpec([], tf.string)
  signature = {
    "rgb": tf.TensorSpec([spec.max_frames, spec.rgb_size], tf.uint8),
    "audio": tf.TensorSpec([spec.max_frames, spec.audio_size], tf.uint8),
    "num_frames": tf.TensorSpec([], tf.int32),
    "labels": tf.TensorSpec([spec.num_classes], tf.float32),
    "id": string,
    "problem": string,
  }
  # One record after the other, so that the first bad record is the one reported (as before).
  elems = (names_B, records_B, seeds_Bx2)
  return tf.map_fn(one, elems, fn_output_signature=signature, parallel_iterations=1)


def _kept(spec: RecordSpec, records_B, runs, stored_B, headers, seeds_Bx2):
  """(uint8 rgb [B, T, F], uint8 audio [B, T, F'], whether every stored frame is canonical):
  the first T frames, or with seeds an ordered random T of the videos longer than T."""
  keep = spec.max_frames
  rgb = (*runs[0], stored_B, headers[0], spec.rgb_size, keep)
  audio = (*runs[1], stored_B, headers[1], spec.audio_size, keep)
  first = lambda: (_run(records_B, *rgb), _run(records_B, *audio))
  if seeds_Bx2 is None:
    (q_rgb, rgb_ok), (q_audio, audio_ok) = first()
  else:

    def sampled():
      idx_BxT = _sampled_indices(stored_B, seeds_Bx2, keep)
      return _run(records_B, *rgb, idx_BxT), _run(records_B, *audio, idx_BxT)

    long = tf.reduce_any(stored_B > keep)
    (q_rgb, rgb_ok), (q_audio, audio_ok) = tf.cond(long, sampled, first)
  return q_rgb, q_audio, rgb_ok & audio_ok


def _frame_counts(spec: RecordSpec, records_B, headers):
  """(ok [B], rgb and audio runs (start, length), frames stored [B]): ok where the layout is
  the expected one and both runs hold the same number (> 0) of whole frames; the runs of the
  other rows are emptied."""
  ok_B, (rgb_start_B, rgb_size_B), (audio_start_B, audio_size_B) = frame_layout.layout(
    records_B, spec.rgb_key, spec.audio_key
  )
  rgb_F, audio_F = len(headers[0]) + spec.rgb_size, len(headers[1]) + spec.audio_size
  ok_B &= (rgb_size_B % rgb_F == 0) & (audio_size_B % audio_F == 0) & (rgb_size_B > 0)
  ok_B &= rgb_size_B // rgb_F == audio_size_B // audio_F
  # Checking frames past the T kept decodes every row to the longest: far longer videos (custom
  # data) go through the per-record parser, which holds one video at a time.
  ok_B &= rgb_size_B // rgb_F <= _LONGEST * spec.max_frames
  rgb_size_B, audio_size_B = tf.where(ok_B, rgb_size_B, 0), tf.where(ok_B, audio_size_B, 0)
  runs = ((rgb_start_B, rgb_size_B), (audio_start_B, audio_size_B))
  return ok_B, runs, tf.cast(rgb_size_B // rgb_F, tf.int32)


def _fast(spec: RecordSpec, names_B, records_B, runs, stored_B, headers, seeds_Bx2):
  """(the parsed batch, whether it is exact) of records whose layout fits. Their context goes
  through TensorFlow's parser only once every frame proved canonical, so that a bad frame is
  reported before a bad context, as the per-record parser reports them."""
  q_rgb, q_audio, frames_ok = _kept(spec, records_B, runs, stored_B, headers, seeds_Bx2)

  def with_context():
    rows = tf.shape(records_B)[0]
    context = records.parse_context(spec, records_B, names_B)
    labels_BxC, in_range = _multi_hot(context[spec.labels_key], rows, spec.num_classes)
    parsed = {
      "rgb": q_rgb,
      "audio": q_audio,
      "num_frames": tf.minimum(stored_B, spec.max_frames),
      "labels": labels_BxC,
      "id": records.video_ids(spec, context),
      "problem": tf.fill([rows], ""),
    }
    return parsed, in_range if spec.check_labels else tf.constant(True)

  return tf.cond(frames_ok, with_context, lambda: _nothing(spec, headers))


def _nothing(spec: RecordSpec, headers) -> tuple[dict, tf.Tensor]:
  """_fast's result for a batch whose layout does not fit: empty, and not exact."""
  frames_of = lambda header, size: tf.zeros([0, spec.max_frames, len(header) + size], tf.uint8)
  parsed = {
    "rgb": frames_of(headers[0], spec.rgb_size),
    "audio": frames_of(headers[1], spec.audio_size),
    "num_frames": tf.zeros([0], tf.int32),
    "labels": tf.zeros([0, spec.num_classes], tf.float32),
    "id": tf.zeros([0], tf.string),
    "problem": tf.zeros([0], tf.string),
  }
  return parsed, tf.constant(False)


def parse_batch(spec: RecordSpec, names_B, records_B, batch_size: int, seeds_Bx2=None) -> dict:
  """A finished batch (records.finish_batch) of frame-level records; seeds_Bx2: each record's
  frame-sampling seed (training with data.random_frames), or None to keep the first T frames."""
  headers = (frame_layout.frame_header(spec.rgb_size), frame_layout.frame_header(spec.audio_size))
  ok_B, runs, stored_B = _frame_counts(spec, records_B, headers)
  # Data laid out otherwise costs no decoding here on top of the per-record parser's.
  fast = lambda: _fast(spec, names_B, records_B, runs, stored_B, headers, seeds_Bx2)
  parsed, ok = tf.cond(tf.reduce_all(ok_B), fast, lambda: _nothing(spec, headers))
  slow = lambda: _per_record(spec, names_B, records_B, seeds_Bx2)
  sizes_B = tf.strings.length(records_B)

  def finish(parsed: dict, widths: tuple[int, int]) -> dict:
    parsed = {**parsed, "file": names_B, "bytes": sizes_B}
    return records.finish_batch(parsed, batch_size, spec.feature_dtype, widths)

  # The fast path's frames keep their headers until the dequantize skips them.
  widths = (len(headers[0]), len(headers[1]))
  return tf.cond(ok, lambda: finish(parsed, widths), lambda: finish(slow(), (0, 0)))


@functools.cache
def batch_parser(spec: RecordSpec, batch_size: int, sampled: bool):
  """parse_batch as a tf.function traced once per process (names_B, records_B[, seeds_Bx2]):
  each dataset built on it then starts without tracing its few hundred ops again."""
  strings = tf.TensorSpec([None], tf.string)
  if sampled:
    signature = [strings, strings, tf.TensorSpec([None, 2], tf.int64)]
    parse = lambda names_B, records_B, seeds_Bx2: parse_batch(
      spec, names_B, records_B, batch_size, seeds_Bx2
    )
  else:
    signature = [strings, strings]
    parse = lambda names_B, records_B: parse_batch(spec, names_B, records_B, batch_size)
  return tf.function(parse, input_signature=signature, autograph=False)
