"""Bad records: wrong frame sizes and counts, labels outside num_classes, features of another
type. Each problem is one DataError line naming the file and the feature."""

import numpy as np
import pytest
import tensorflow as tf
from pipeline_fakes import A, D, eval_error, small_config, train_error, video, write

from mfb_jax import input_pipeline
from mfb_jax.bench_input import frame_record, video_record
from mfb_jax.errors import DataError


def frame_problem(tmp_path, record: bytes) -> str:
  """Error for a shard of two good videos then `record` (so it is found in the second batch)."""
  good = [frame_record(f"ok{i}", *video(4, seed=i), [1]) for i in range(2)]
  path = write(tmp_path / "bad.tfrecord", [*good, record])
  message = eval_error(small_config(), path)
  assert message.startswith(f"{path}: video 'bad': ")
  return message[len(f"{path}: video 'bad': ") :]


def test_wrong_frame_sizes(tmp_path):
  rgb, audio = video(5)
  wide_rgb = [*rgb[:2], np.zeros(D + 3, np.uint8), *rgb[3:]]  # Only frame 2 is wrong.
  why = frame_problem(tmp_path, frame_record("bad", wide_rgb, audio, [1]))
  assert why == f"feature 'rgb' has frames of {D + 3} bytes, expected {D} (data.rgb_size)"
  narrow_audio = [a[:1] for a in audio]
  why = frame_problem(tmp_path, frame_record("bad", rgb, narrow_audio, [1]))
  assert why == f"feature 'audio' has frames of 1 bytes, expected {A} (data.audio_size)"


def test_frame_counts_and_missing_frames(tmp_path):
  rgb, audio = video(5)
  why = frame_problem(tmp_path, frame_record("bad", rgb, audio[:4], [1]))
  assert why == "'rgb' has 5 frames but 'audio' has 4"
  why = frame_problem(tmp_path, frame_record("bad", rgb, audio[:0], [1]))
  assert why == "no 'audio' frames while 'rgb' has 5 (is data.audio_feature its name?)"
  # A video-level record given to the frame-level reader has no frames at all.
  why = frame_problem(tmp_path, video_record("bad", np.zeros(D), np.zeros(A), [1]))
  assert why.startswith("no 'rgb' frames (a video without frames, or no frame-level data: see")


@pytest.mark.parametrize(
  "record, why, video_why",
  [
    # Parsed as an empty message: it read "video '': no 'rgb' frames ...".
    (
      b"",
      "a record without an id: no 'rgb' frames (a video without frames, or no frame-level",
      "a record without an id: no feature 'mean_rgb' (is this video-level data?",
    ),
    # TensorFlow's "Invalid protocol message input, example id: FILE" names no record.
    (bytes(range(256)) * 2, *["record 2 (counting from 0) does not parse as a tf.train."] * 2),
  ],
)
def test_bytes_that_are_no_record_are_one_line_saying_so(tmp_path, record, why, video_why):
  good = [frame_record(f"ok{i}", *video(4, seed=i), [1]) for i in range(2)]
  path = write(tmp_path / "bad.tfrecord", [*good, record])
  for error in (eval_error, train_error):
    assert error(small_config(), path).startswith(f"{path}: {why}")
  # Video-level: "Could not parse example input, value: '" and the record's raw bytes.
  config = small_config()
  config.data.format = "video"
  good = [video_record(f"ok{i}", np.zeros(D), np.zeros(A), [1]) for i in range(2)]
  path = write(tmp_path / "bad_video.tfrecord", [*good, record])
  assert eval_error(config, path).startswith(f"{path}: {video_why}")


@pytest.mark.parametrize("label", [10, -1])
def test_label_outside_num_classes(tmp_path, label):
  why = frame_problem(tmp_path, frame_record("bad", *video(3), [2, label]))
  assert why == f"label {label} is outside [0, 10) (data.num_classes=10)"
  # Predictions ignore labels: another dataset version's (2017: 4716 classes) are read anyway.
  path = write(tmp_path / "other.tfrecord", [frame_record("v", *video(3), [2, label])])
  batch = next(input_pipeline.make_eval_iterator(small_config(), path, 2, check_labels=False))
  assert list(batch["id"]) == ["v", ""] and np.flatnonzero(batch["labels"][0]).tolist() == [2]


def test_train_iterator_reports_bad_records_too(tmp_path):
  path = write(tmp_path / "bad.tfrecord", [frame_record("bad", *video(3), [1, 99])] * 2)
  message = train_error(small_config(), path)
  assert message == f"{path}: video 'bad': label 99 is outside [0, 10) (data.num_classes=10)"


def test_video_level_feature_sizes(tmp_path):
  good = video_record("ok", np.zeros(D), np.zeros(A), [1], id_key="video_id")
  bad = video_record("bad", np.zeros(D - 1), np.zeros(A), [1], id_key="video_id")
  path = write(tmp_path / "v.tfrecord", [good, bad])
  message = eval_error(small_config("video"), path)
  assert message == f"{path}: video 'bad': feature 'mean_rgb' has {D - 1} values, expected {D} " + (
    "(data.rgb_size)"
  )
  for value in (np.nan, np.inf):
    poisoned = video_record("bad", np.zeros(D), [0.0] * (A - 1) + [value], [1], id_key="video_id")
    path = write(tmp_path / "n.tfrecord", [good, poisoned])
    message = eval_error(small_config("video"), path)
    assert message == f"{path}: video 'bad': feature 'mean_audio' holds NaN or infinite values"
  frame_level = write(tmp_path / "f.tfrecord", [frame_record("bad", *video(2), [1])])
  message = eval_error(small_config("video"), frame_level)
  assert message.startswith(f"{frame_level}: video 'bad': no feature 'mean_rgb' (is this video")


def test_parser_errors_name_the_file(tmp_path):
  example = tf.train.Example()
  example.features.feature["id"].bytes_list.value.append(b"x")
  example.features.feature["labels"].float_list.value.append(1.5)  # Should be int64.
  path = write(tmp_path / "floats.tfrecord", [example.SerializeToString()])
  message = eval_error(small_config(), path)
  assert (
    message.startswith(f"{path}: video 'x': feature 'labels' ")
    and "expected int64 values" in message
  )


def _float_frames() -> bytes:
  """A SequenceExample whose frames are float lists (dequantized), not uint8 byte strings."""
  example = tf.train.SequenceExample()
  example.context.feature["id"].bytes_list.value.append(b"f")
  for key, size in (("rgb", D), ("audio", A)):
    example.feature_lists.feature_list[key].feature.add().float_list.value.extend([0.5] * size)
  return example.SerializeToString()


def test_features_of_another_value_type_are_one_line_naming_the_file_and_video(tmp_path):
  # TensorFlow names the file; the video is found by parsing its records one by one.
  good = frame_record("ok", *video(2), [1])
  frames = write(
    tmp_path / "floats-0.tfrecord", [good, _float_frames(), frame_record("no", *video(3), [2])]
  )
  for message in (eval_error(small_config(), frames), train_error(small_config(), frames)):
    assert message.startswith(f"{frames}: video 'f': feature '")  # rgb or audio: either.
    assert message.endswith(
      "expected bytes (frame-level: one uint8 string per frame, data.format='frame')"
    )
  # Video-level parse errors name no file in TensorFlow's text: the file is found by reading
  # the files one by one, so the bad one is named even behind a good one.
  bad = tf.train.Example()
  bad.features.feature["mean_rgb"].bytes_list.value.append(b"\0" * D)
  bad.features.feature["mean_audio"].float_list.value.extend([0.0] * A)
  bad.features.feature["id"].bytes_list.value.append(b"bad-v")
  good = video_record("ok", np.zeros(D), np.zeros(A), [1])
  write(tmp_path / "v-0.tfrecord", [good])
  path = write(tmp_path / "v-1.tfrecord", [good, bad.SerializeToString()])
  pattern = str(tmp_path / "v-*.tfrecord")
  for message in (
    eval_error(small_config("video"), pattern),
    train_error(small_config("video"), pattern),
  ):
    assert message == (
      f"{path}: video 'bad-v': feature 'mean_rgb' holds bytes values; expected floats "
      "(video-level, data.format='video')"
    )


def test_a_frame_with_two_values_is_one_line_naming_the_file_and_video(tmp_path):
  record = tf.train.SequenceExample()
  record.context.feature["id"].bytes_list.value.append(b"v")
  for key, size in (("rgb", D), ("audio", A)):
    frame = record.feature_lists.feature_list[key].feature.add()
    frame.bytes_list.value.extend([bytes(size)] * (2 if key == "audio" else 1))
  good = frame_record("ok", *video(2), [1])
  path = write(tmp_path / "two-0.tfrecord", [good, record.SerializeToString()])
  assert eval_error(small_config(), path) == (
    f"{path}: video 'v': frame 0 of feature 'audio' holds 2 values; the official format has "
    "one bytes value per frame"
  )
  record.context.feature["id"].bytes_list.value[0] = b"\xff"  # Named as the CSVs name it.
  write(tmp_path / "two-0.tfrecord", [record.SerializeToString()])
  assert eval_error(small_config(), path).startswith(f"{path}: video '\\xff': frame 0 of")
  del record.context.feature["id"]  # No id: the record's place.
  write(tmp_path / "two-0.tfrecord", [good, record.SerializeToString()])
  message = eval_error(small_config(), path)
  assert message.startswith(f"{path}: record 1 (counting from 0): frame 0 of feature 'audio'")


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (payloads under 2**14 bytes)."""
  size = bytes([len(payload) & 127 | 128, len(payload) >> 7]) if len(payload) > 127 else b""
  return bytes([number << 3 | 2]) + (size or bytes([len(payload)])) + payload


def _entry(key: bytes, value: bytes) -> bytes:
  return _field(1, _field(1, key) + _field(2, value))


def test_encodings_tensorflow_does_not_read_are_lines_naming_the_video_or_record(tmp_path):
  # Valid protobuf (tf.train.SequenceExample.FromString reads each), refused by TensorFlow's
  # parser, whose own words name neither the video nor the record (README.md, "Formats").
  ident, labels = (
    _entry(b"id", _field(1, _field(1, b"u"))),
    _entry(b"labels", _field(3, _field(1, b"\x01"))),
  )
  rgb, audio = video(2)
  frame = lambda x, extra=b"": _field(1, _field(1, _field(1, x.tobytes())) + extra)
  lists = lambda extra=b"": (
    _entry(b"rgb", b"".join(frame(x, extra) for x in rgb))
    + _entry(b"audio", b"".join(frame(x) for x in audio))
  )
  cases = {
    # Each rgb frame's Feature with an unknown field 7 (a varint).
    _field(1, ident + labels) + _field(2, lists(b"\x38\x01")): "video 'u': a frame of feature "
    "'rgb' is no Feature of one bytes value (or is written in an encoding that TensorFlow's "
    "parser does not read?)",
    # The feature lists with an unknown field 5 (a varint).
    _field(1, ident + labels) + _field(2, lists() + b"\x28\x01"): "record 2 (counting from 0) "
    "does not parse as a tf.train.SequenceExample or Example (not one, or written in an "
    "encoding that TensorFlow's parser does not read)",
    # An id feature whose bytes list is empty.
    _field(1, _entry(b"id", _field(1, b"")) + labels) + _field(2, lists()): "record 2 (counting "
    "from 0): the feature read as its id (data.id_feature) holds no value",
  }
  good = [frame_record(f"ok{i}", *video(2, seed=i), [1]) for i in range(2)]
  for record, why in cases.items():
    assert tf.train.SequenceExample.FromString(record).context.feature["labels"]
    path = write(tmp_path / "odd.tfrecord", [*good, record])
    assert eval_error(small_config(), path) == f"{path}: {why}"
    assert train_error(small_config(), path) == f"{path}: {why}"


def test_read_ids_and_labels_checks_label_range(tmp_path):
  path = write(tmp_path / "l.tfrecord", [frame_record("v", *video(2), [3, 12])])
  with pytest.raises(DataError, match=f"^{path}: video 'v': label 12 is outside \\[0, 10\\)"):
    list(input_pipeline.read_ids_and_labels(path, small_config()))


def test_a_file_with_bad_records_of_two_kinds_names_each_by_its_own_place(tmp_path):
  # Training reads records shuffled, so either error may come first; the record named must be
  # the one that has it (it named the first bad record of the file, whatever its problem).
  garbage = bytes(range(256)) * 2
  empty_id = _field(1, _entry(b"id", _field(1, b""))) + _field(2, _entry(b"rgb", b""))
  lines = {
    "floats": "video 'f': feature '",
    "garbage": "does not parse as a tf.train.SequenceExample",
    "empty_id": "the feature read as its id (data.id_feature) holds no value",
  }
  records_of = {"floats": _float_frames(), "garbage": garbage, "empty_id": empty_id}
  for kinds in (("floats", "garbage"), ("garbage", "empty_id"), ("empty_id", "floats")):
    path = write(tmp_path / f"{'-'.join(kinds)} two.tfrecord", [records_of[k] for k in kinds])
    assert eval_error(small_config(), path).startswith(f"{path}: ")  # The file, space and all.
    for _ in range(3):
      message = train_error(small_config(), path)
      place = {k: i for i, k in enumerate(kinds)}
      kind = next(k for k in kinds if lines[k] in message)
      if kind != "floats":
        assert f"{path}: record {place[kind]} (counting from 0)" in message, message
