"""frame_batch: batches read from the records' byte layout equal the per-record parser's, and
every record laid out otherwise goes through that parser."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from pipeline_fakes import A, D, eval_error, small_config, video, write
from test_input_pipeline import SAMPLE, needs_sample

from mfb_jax import frame_batch, frame_layout, frames, records
from mfb_jax.bench_input import frame_record

T = 8  # small_config's max_frames.


def _varint(value: int) -> bytes:  # Written here again, bit by bit, to check frame_batch's.
  out = b""
  while value >= 128:
    out += bytes([128 + value % 128])
    value //= 128
  return out + bytes([value])


def _field(number: int, payload: bytes) -> bytes:
  return bytes([number * 8 + 2]) + _varint(len(payload)) + payload


def _frame_list(frames_SxD) -> bytes:
  feature = lambda f: tf.train.Feature(bytes_list=tf.train.BytesList(value=[f.tobytes()]))
  return tf.train.FeatureList(feature=[feature(f) for f in frames_SxD]).SerializeToString()


def _hand_made(video_id, rgb, audio, labels, audio_first=False, context_last=False) -> bytes:
  """A SequenceExample assembled field by field: the map entries and fields in another order."""
  context = tf.train.Features(
    feature={
      "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[video_id.encode()])),
      "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
    }
  ).SerializeToString()
  entries = [_field(1, _field(1, b"rgb") + _field(2, _frame_list(rgb)))]
  entries.append(_field(1, _field(1, b"audio") + _field(2, _frame_list(audio))))
  lists = _field(2, b"".join(entries[::-1] if audio_first else entries))
  return lists + _field(1, context) if context_last else _field(1, context) + lists


def _spec(dtype="float32", check_labels=True):
  config = small_config()
  config.model.dtype = dtype
  return dataclasses.replace(records.RecordSpec.from_config(config), check_labels=check_labels)


def _per_record(spec, serialized, seeds=None) -> dict:
  """The reference: frames.parse_frame_record on each record, then records.finish_batch."""
  seeds = [None] * len(serialized) if seeds is None else seeds
  parsed = [
    frames.parse_frame_record(spec, tf.constant("f"), tf.constant(record), seed)
    for record, seed in zip(serialized, seeds, strict=True)
  ]
  batch = {key: tf.stack([p[key] for p in parsed]) for key in parsed[0]}
  batch.update(file=tf.fill([len(serialized)], "f"), bytes=tf.strings.length(serialized))
  return records.finish_batch(batch, len(serialized) + 1, spec.feature_dtype)


def _batch(spec, serialized, seeds=None) -> dict:
  names = tf.fill([len(serialized)], "f")
  return frame_batch.parse_batch(spec, names, tf.constant(serialized), len(serialized) + 1, seeds)


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@pytest.fixture
def no_per_record_path(monkeypatch):
  """parse_batch without its per-record path: a batch that needs it fails the test."""

  def refuse(*args):
    raise AssertionError("the batch went through the per-record parser")

  monkeypatch.setattr(frame_batch, "_per_record", refuse)


@pytest.mark.parametrize("size", [1, 3, 127, 128, 1024, 20000])
def test_frame_header_is_what_protobuf_writes_before_each_frame(size):
  rng = np.random.default_rng(size)
  frames_SxD = rng.integers(0, 256, (3, size), np.uint8)
  header = bytes(frame_layout.frame_header(size))
  assert _frame_list(frames_SxD) == b"".join(header + f.tobytes() for f in frames_SxD)
  for value in (0, 1, 127, 128, 300, 2**21, 2**35 - 1):
    assert bytes(frame_layout.varint_bytes(value)) == _varint(value)


def _videos(lengths=(1, 5, T, T + 3)):
  """Records of these frame counts (labels with a repeat), and one of T + 1 frames laid out in
  another order."""
  out = [frame_record(f"v{n}", *video(n, seed=n), [n % 10, 3, 3]) for n in lengths]
  return out + [_hand_made("swapped", *video(T + 1, seed=9), [9, 0], audio_first=True)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("lengths", [(1, 5, T, T + 3), (T, T + 2, T + 5)])
def test_batches_equal_the_per_record_parse(dtype, sampled, lengths, no_per_record_path):
  spec, serialized = _spec(dtype), _videos(lengths)
  seeds = tf.constant([[7, i] for i in range(len(serialized))], tf.int64) if sampled else None
  want = _per_record(spec, serialized, seeds)
  got = _batch(spec, serialized, seeds)
  _assert_same(got, want)
  assert got["rgb"].dtype == spec.feature_dtype and got["valid"].numpy().tolist()[-1] == 0


@needs_sample
def test_the_real_frame_level_record_is_read_by_its_layout(no_per_record_path):
  config = small_config()
  config.data.update(rgb_size=1024, audio_size=128, num_classes=3862, max_frames=300)
  spec = records.RecordSpec.from_config(config)
  path = str(SAMPLE / "derived_example_frame_level.tfrecord")
  serialized = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  ok_B, (rgb_start, rgb_size), (audio_start, audio_size) = frame_layout.layout(
    tf.constant(serialized), "rgb", "audio"
  )
  assert ok_B.numpy().tolist() == [True]
  assert rgb_size.numpy()[0] == 170 * 1033 and audio_size.numpy()[0] == 170 * 137
  batch = _batch(spec, serialized)
  assert batch["mask"].numpy()[0].sum() == 170 and batch["id"].numpy()[0] == b"SjJ3"


def _bad_tail(n: int) -> bytes:
  """A record whose frame T + 1 is a float list of the same length: not kept, but invalid."""
  rgb, audio = video(n, seed=1)
  record = frame_record("tail", rgb, audio, [1])
  header = bytes(frame_layout.frame_header(D))
  at = record.index(header + rgb[T + 1].tobytes())
  bad = bytes([0x0A, header[1], 0x12]) + header[3:]  # Feature.float_list in place of bytes_list.
  return record[:at] + bad + record[at + len(header) :]


def _laid_out_otherwise():
  rgb, audio = video(4, seed=3)
  extra = tf.train.SequenceExample.FromString(frame_record("extra", rgb, audio, [1]))
  extra.feature_lists.feature_list["more"].feature.add().bytes_list.value.append(b"x")
  return {
    "extra feature list": extra.SerializeToString(),
    "context after the lists": _hand_made("last", rgb, audio, [2], context_last=True),
    "frame of another size": frame_record("size", [*rgb[:2], rgb[2][:-1], rgb[3]], audio, [1]),
    "label outside num_classes": frame_record("label", rgb, audio, [1, 12]),
    "frame counts differ": frame_record("counts", rgb, audio[:3], [1]),
    "no frames": frame_record("none", rgb[:0], audio[:0], [1]),
  }


@pytest.mark.parametrize("case", sorted(_laid_out_otherwise()))
def test_records_laid_out_otherwise_read_as_the_per_record_parser_reads_them(case):
  spec = _spec()
  serialized = [_videos()[1], _laid_out_otherwise()[case]]
  want = _per_record(spec, serialized)
  _assert_same(_batch(spec, serialized), want)
  problem = want["problem"].numpy().decode()
  assert (problem == "") == (case in ("extra feature list", "context after the lists"))


def test_predictions_ignore_labels_outside_num_classes_without_the_per_record_parser(
  no_per_record_path,
):
  spec = _spec(check_labels=False)
  serialized = [frame_record("label", *video(4, seed=3), [1, 12, -1])]
  batch = _batch(spec, serialized)
  assert np.flatnonzero(batch["labels"].numpy()[0]).tolist() == [1]


def test_a_bad_frame_past_the_kept_ones_is_an_error_as_in_the_per_record_parser():
  spec = _spec()
  serialized = [_videos()[0], _bad_tail(T + 3)]
  with pytest.raises(tf.errors.InvalidArgumentError) as want:
    _per_record(spec, serialized)
  with pytest.raises(tf.errors.InvalidArgumentError) as got:
    _batch(spec, serialized)
  assert "Data types don't match" in str(want.value) and "Data types don't match" in str(got.value)


def test_audio_sizes_and_long_keys_stay_within_the_window():
  assert len(frame_layout.frame_header(A)) == 6 and len(frame_layout.frame_header(D)) == 6
  serialized = [_videos()[1]]
  ok_B, _, _ = frame_layout.layout(tf.constant(serialized), "r" * 100, "audio")
  assert ok_B.numpy().tolist() == [False]


def _bad_frame_record() -> bytes:  # Frame 1 of 'rgb' a float list: "Data types don't match".
  example = tf.train.SequenceExample.FromString(frame_record("frame", *video(5, seed=3), [2]))
  feature = example.feature_lists.feature_list["rgb"].feature[1]
  feature.ClearField("bytes_list")
  feature.float_list.value.append(1.0)
  return example.SerializeToString()


def _bad_context_record() -> bytes:  # Labels as bytes: the context parser's type error.
  example = tf.train.SequenceExample.FromString(frame_record("context", *video(5), [1]))
  example.context.feature["labels"].ClearField("int64_list")
  example.context.feature["labels"].bytes_list.value.append(b"1")
  return example.SerializeToString()


def test_the_first_bad_record_is_the_one_reported(tmp_path):
  with pytest.raises(tf.errors.InvalidArgumentError) as got:
    _batch(_spec(), [_bad_frame_record(), _bad_context_record()])
  assert "Feature list: rgb" in str(got.value)
  write(tmp_path / "a.tfrecord", [_bad_frame_record()])
  write(tmp_path / "b.tfrecord", [_bad_context_record()])
  message = eval_error(small_config(), str(tmp_path / "*.tfrecord"))
  assert message.startswith(str(tmp_path / "a.tfrecord")) and "'rgb'" in message, message


def test_long_feature_names_and_far_longer_videos(no_per_record_path):
  names = ("r" * 100, "a" * 100)
  rgb, audio = video(T + 2, seed=5)
  record = tf.train.SequenceExample.FromString(frame_record("long", rgb, audio, [1]))
  lists = record.feature_lists.feature_list
  for old, new in zip(("rgb", "audio"), names, strict=True):
    lists[new].CopyFrom(lists[old])
    del lists[old]
  spec = dataclasses.replace(_spec(), rgb_key=names[0], audio_key=names[1])
  batch = _batch(spec, [record.SerializeToString()])
  np.testing.assert_array_equal(batch["mask"].numpy()[0], np.ones(T))
  longest = frame_batch._LONGEST * T
  fits = frame_record("fits", *video(longest, seed=6), [1])
  headers = (frame_layout.frame_header(D), frame_layout.frame_header(A))
  ok_B, _, _ = frame_batch._frame_counts(_spec(), tf.constant([fits]), headers)
  assert ok_B.numpy().tolist() == [True]
  too_long = [frame_record("far", *video(longest + 1, seed=6), [1])]
  with pytest.raises(AssertionError, match="per-record parser"):
    _batch(_spec(), too_long)
