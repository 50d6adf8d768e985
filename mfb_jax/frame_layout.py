"""Where the rgb and audio frames of frame-level records lie in their bytes (the fast path's map).

Letters: B batch, W bytes of a window, V bytes of a varint. A SequenceExample as the official
writers (and TensorFlow's SerializeToString) lay it out is its context (field 1), then its
feature lists (field 2): two map entries, the rgb and the audio one in either order, each a key
(field 1) and a FeatureList (field 2), whose frames are one run of pieces of a fixed size: a
header (frame_header) and the frame's bytes. layout() finds both runs from a few varints read
in windows at the places where the fields start, vectorized over a batch of serialized records,
and says for which records the layout is exactly that; frame_batch.py reads the runs.
"""

import tensorflow as tf

_W = 128  # Bytes read where each field starts: feature names up to about 110 bytes fit.
_MAX_VARINT = 5  # Bytes of a varint below 2**35; a record is at most 2 GB.
_IDX_WxV = tf.range(_W)[:, None] + tf.range(_MAX_VARINT)[None, :]
_SHIFTS_V = tf.constant([0, 7, 14, 21, 28], tf.int64)
# Field tags (field number << 3 | 2, length-delimited) of the SequenceExample wire format.
_TAG_1, _TAG_2 = 0x0A, 0x12  # context / map key / feature / bytes_list / value: 1; lists, value: 2


def varint_bytes(value: int) -> list[int]:
  """The protobuf varint encoding of a non-negative int."""
  out = []
  while True:
    low, value = value & 127, value >> 7
    out.append(low | (128 if value else 0))
    if not value:
      return out


def frame_header(size: int) -> list[int]:
  """The bytes before each frame's data in a FeatureList of `size`-byte frames: a Feature
  (field 1) holding a BytesList (field 1) holding one value (field 1) of `size` bytes."""
  value = [_TAG_1, *varint_bytes(size)]
  bytes_list = [_TAG_1, *varint_bytes(len(value) + size), *value]
  return [_TAG_1, *varint_bytes(len(bytes_list) + size), *bytes_list]


def _window(records_B: tf.Tensor, pos_B: tf.Tensor) -> tf.Tensor:
  """int64 [B, W + 5]: each record's bytes from pos (zero past its end)."""
  piece_B = piece(records_B, pos_B, tf.fill(tf.shape(pos_B), tf.constant(_W, tf.int64)))
  return tf.cast(tf.io.decode_raw(piece_B, tf.uint8, fixed_length=_W + _MAX_VARINT), tf.int64)


def _len(records_B: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.strings.length(records_B), tf.int64)


def piece(records_B: tf.Tensor, start_B: tf.Tensor, size_B: tf.Tensor) -> tf.Tensor:
  """Each record's bytes [start, start + size), cut to the record (positions read from a
  record that is not laid out as expected can point anywhere)."""
  start_B = tf.clip_by_value(start_B, 0, _len(records_B))
  return tf.strings.substr(
    records_B, start_B, tf.clip_by_value(size_B, 0, _len(records_B) - start_B)
  )


def _varints(w_BxW: tf.Tensor):
  """(value, length) [B, W] of the varint starting at each window position (length 0: none)."""
  g_BxWxV = tf.gather(w_BxW, _IDX_WxV, axis=1)
  more_BxWxV = tf.cast(g_BxWxV >= 128, tf.int64)
  # Bytes of the varint: those after which every byte so far said "more" (an exclusive cumprod,
  # written out: Eigen's scan was 1.5% of the pipeline's CPU).
  more = tf.unstack(more_BxWxV[:, :, :-1], axis=2)
  running = [tf.ones_like(more[0])]
  for flag in more:
    running.append(running[-1] * flag)
  part_BxWxV = tf.stack(running, axis=2)
  value_BxW = tf.reduce_sum(part_BxWxV * tf.bitwise.left_shift(g_BxWxV & 127, _SHIFTS_V), 2)
  ends_BxW = tf.reduce_sum(part_BxWxV * (1 - more_BxWxV), 2) > 0  # Its last byte is in reach.
  return value_BxW, tf.where(ends_BxW, tf.reduce_sum(part_BxWxV, 2), 0)


def _at(x_BxW: tf.Tensor, i_B: tf.Tensor) -> tf.Tensor:
  """x[b, i[b]] (positions past the window read its last entry; callers check reach)."""
  i_B = tf.cast(tf.minimum(i_B, x_BxW.shape[1] - 1), tf.int32)
  return tf.gather(x_BxW, i_B, axis=1, batch_dims=1)


def _entry(records_B: tf.Tensor, pos_B: tf.Tensor, keys: tuple[str, str]):
  """One FeatureLists map entry at pos: (ok, which key, value start, value length, entry end)."""
  w_BxW = _window(records_B, pos_B)
  value_BxW, length_BxW = _varints(w_BxW)
  zero_B = tf.zeros_like(pos_B)
  size_B, size_bytes_B = _at(value_BxW, zero_B + 1), _at(length_BxW, zero_B + 1)
  key_B = 1 + size_bytes_B  # The key's tag.
  key_size_B = _at(w_BxW, key_B + 1)
  which_B = tf.fill(tf.shape(pos_B), tf.constant(-1, tf.int64))
  for index, key in enumerate(keys):
    key_K = list(key.encode())
    at_BxK = tf.minimum(key_B[:, None] + 2 + tf.range(len(key_K), dtype=tf.int64)[None], _W)
    got_BxK = tf.gather(w_BxW, tf.cast(at_BxK, tf.int32), batch_dims=1)
    same_B = (key_size_B == len(key_K)) & tf.reduce_all(got_BxK == key_K, 1)
    which_B = tf.where(same_B, tf.constant(index, tf.int64), which_B)
  value_tag_B = key_B + 2 + key_size_B
  list_size_B, list_size_bytes_B = _at(value_BxW, value_tag_B + 1), _at(length_BxW, value_tag_B + 1)
  start_B = pos_B + value_tag_B + 1 + list_size_bytes_B
  end_B = pos_B + key_B + size_B
  ok_B = (_at(w_BxW, zero_B) == _TAG_1) & (size_bytes_B > 0) & (_at(w_BxW, key_B) == _TAG_1)
  ok_B &= (which_B >= 0) & (value_tag_B + 1 + _MAX_VARINT < _W)
  ok_B &= (_at(w_BxW, value_tag_B) == _TAG_2) & (list_size_bytes_B > 0)
  return ok_B & (start_B + list_size_B == end_B), which_B, start_B, list_size_B, end_B


def layout(records_B: tf.Tensor, rgb_key: str, audio_key: str):
  """(ok [B], rgb run (start, length), audio run (start, length)): ok where a record is the
  context (field 1), then the feature lists (field 2) with exactly the two features, in
  either order, and nothing else."""
  length_B = _len(records_B)
  zero_B = tf.zeros_like(length_B)
  w_BxW = _window(records_B, zero_B)
  value_BxW, size_bytes_BxW = _varints(w_BxW)
  lists_B = 1 + _at(size_bytes_BxW, zero_B + 1) + _at(value_BxW, zero_B + 1)  # Context skipped.
  ok_B = (_at(w_BxW, zero_B) == _TAG_1) & (_at(size_bytes_BxW, zero_B + 1) > 0)
  w_BxW = _window(records_B, lists_B)
  value_BxW, size_bytes_BxW = _varints(w_BxW)
  first_B = lists_B + 1 + _at(size_bytes_BxW, zero_B + 1)
  ok_B &= (_at(w_BxW, zero_B) == _TAG_2) & (_at(size_bytes_BxW, zero_B + 1) > 0)
  ok_B &= first_B + _at(value_BxW, zero_B + 1) == length_B
  keys = (rgb_key, audio_key)
  ok1_B, which1_B, start1_B, size1_B, end1_B = _entry(records_B, first_B, keys)
  ok2_B, which2_B, start2_B, size2_B, end2_B = _entry(records_B, end1_B, keys)
  ok_B &= ok1_B & ok2_B & (end2_B == length_B) & (which1_B + which2_B == 1)
  rgb_first_B = which1_B == 0
  rgb = tf.where(rgb_first_B, start1_B, start2_B), tf.where(rgb_first_B, size1_B, size2_B)
  audio = tf.where(rgb_first_B, start2_B, start1_B), tf.where(rgb_first_B, size2_B, size1_B)
  return ok_B, rgb, audio
