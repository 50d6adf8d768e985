"""Bad input to the input pipeline: each problem is one DataError line naming file and feature."""

import os

import numpy as np
import pytest
import tensorflow as tf

from configs import default
from mfb_jax import input_pipeline
from mfb_jax.bench_input import frame_record, video_record
from mfb_jax.errors import ConfigError, DataError

D, A = 6, 3


def small_config(fmt="frame"):
  config = default.get_config()
  config.data.update(format=fmt, num_classes=10, max_frames=8, rgb_size=D, audio_size=A)
  config.data.shuffle_buffer = 8
  return config


def video(num_frames: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num_frames, D), np.uint8), rng.integers(
    0, 256, (num_frames, A), np.uint8
  )


def write(path, serialized: list[bytes]) -> str:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in serialized:
      writer.write(record)
  return str(path)


def write_shards(directory, counts: list[int]) -> None:
  for f, count in enumerate(counts):
    records = [frame_record(f"f{f}-{j}", *video(5, seed=j), [j % 10]) for j in range(count)]
    write(directory / f"part-{f}.tfrecord", records)


def first_error(iterator_fn) -> str:
  """The one-line message of the DataError raised while reading everything."""
  with pytest.raises(DataError) as info:
    for _ in zip(range(100), iterator_fn(), strict=False):
      pass
  message = str(info.value)
  assert "\n" not in message and message
  return message


def eval_error(config, pattern: str, batch_size: int = 2) -> str:
  return first_error(lambda: input_pipeline.make_eval_iterator(config, pattern, batch_size))


def train_error(config, pattern: str) -> str:
  return first_error(lambda: input_pipeline.make_train_iterator(config, pattern, 0, 2))


def test_file_patterns(tmp_path):
  write_shards(tmp_path, [1])
  good = str(tmp_path / "part-*.tfrecord")
  with pytest.raises(DataError, match="no file matches '.*nothing-here-\\*'"):
    input_pipeline.list_files(f"{good},{tmp_path}/nothing-here-*")
  with pytest.raises(DataError, match="empty file pattern"):
    input_pipeline.list_files(" , ")
  (tmp_path / "part-9.tfrecord").write_bytes(b"")
  with pytest.raises(DataError, match="part-9.tfrecord is empty \\(0 bytes\\)"):
    input_pipeline.list_files(good)
  assert input_pipeline.list_files(good, 0, 2) == [str(tmp_path / "part-0.tfrecord")]
  (tmp_path / "part-9.tfrecord").unlink()
  (tmp_path / "part-9.tfrecord").symlink_to(tmp_path / "gone.tfrecord")
  with pytest.raises(DataError, match="part-9.tfrecord: cannot read tfrecord file"):
    input_pipeline.list_files(good)


def test_a_glob_in_an_unreadable_directory_says_so(tmp_path, monkeypatch):
  # TensorFlow's glob sees no files in a directory it cannot read. (Tests run as root, who reads
  # any directory, so the permission check itself is faked for that one directory.)
  locked = tmp_path / "locked"
  (locked / "sub").mkdir(parents=True)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(locked) and real_access(p, mode))
  for pattern in (f"{locked}/*.tfrecord", f"{locked}/sub/part-[0-9]*", f"{locked}/gone/x"):
    with pytest.raises(DataError, match=f"directory {locked} cannot be read: permission denied"):
      input_pipeline.list_files(pattern)
  with pytest.raises(DataError, match=r"no file matches '.*nothing-\*'$"):  # A readable one.
    input_pipeline.list_files(f"{tmp_path}/nothing-*")


def test_a_glob_in_a_missing_directory_names_it(tmp_path):
  # A config's default data directory absent in this checkout (configs/yt8m_2017_sample.py
  # outside its usual place) read as a glob that matched nothing.
  (tmp_path / "a_file").write_text("")
  for pattern, named in [
    (f"{tmp_path}/gone/deeper/x-*.tfrecord", f"{tmp_path}/gone does not exist"),
    (f"{tmp_path}/a_file/sub/x", f"{tmp_path}/a_file is not a directory"),
  ]:
    with pytest.raises(DataError) as error:
      input_pipeline.list_files(pattern)
    assert str(error.value) == f"no file matches {pattern!r} ({named})"
  with pytest.raises(DataError, match=r"'$"):  # A directory that is itself a glob: no claim.
    input_pipeline.list_files(f"{tmp_path}/gone[0-9]/x")


def test_train_files_without_a_record_fail_instead_of_waiting_forever(tmp_path):
  import gzip

  with gzip.open(tmp_path / "part-1.tfrecord", "wb"):  # An empty GZIP stream (20 bytes).
    pass
  with tf.io.TFRecordWriter(str(tmp_path / "part-3.tfrecord"), "ZLIB"):  # 8 bytes, no record.
    pass
  pattern = str(tmp_path / "part-*.tfrecord")
  assert "no records in the 2 file(s)" in train_error(small_config(), pattern)
  # One file with a record among empty ones is enough (its batches repeat it) ...
  write(tmp_path / "part-2.tfrecord", [frame_record("only", *video(5), [1])])
  batch = next(input_pipeline.make_train_iterator(small_config(), pattern, 0, 2))
  assert list(batch["id"]) == ["only", "only"]
  # ... but 5 bytes are no tfrecord file: TensorFlow's reader took them for an empty one.
  (tmp_path / "part-0.tfrecord").write_bytes(b"\0" * 5)
  error = train_error(small_config(), pattern)
  assert error.endswith(
    "part-0.tfrecord is no tfrecord file: 5 bytes, fewer than one record takes (16 or more)"
  )


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_file_is_named(tmp_path, damage):
  write_shards(tmp_path, [3, 3, 3])
  path = tmp_path / "part-1.tfrecord"
  data = bytearray(path.read_bytes())
  if damage == "truncated":
    data = data[:-40]
  else:
    data[len(data) // 2] ^= 0xFF  # Inside the second record's payload: its CRC fails.
  path.write_bytes(bytes(data))
  pattern = str(tmp_path / "part-*.tfrecord")
  for message in (eval_error(small_config(), pattern), train_error(small_config(), pattern)):
    assert message.startswith(f"{path}: corrupt or truncated tfrecord file")
    assert ("truncated" if damage == "truncated" else "corrupted") in message
    assert "' failed with" not in message  # TensorFlow's half-quoted "truncated record at N'".


def test_a_file_cut_inside_its_last_record_header_is_named(tmp_path):
  # TensorFlow's reader ends such a file quietly, one record short.
  write_shards(tmp_path, [3, 3, 3])
  path = tmp_path / "part-1.tfrecord"
  data = path.read_bytes()
  last_record = len(data) - (len(frame_record("f1-2", *video(5, seed=2), [2])) + 16)
  path.write_bytes(data[: last_record + 5])  # 5 of the last record's 12 header bytes.
  pattern = str(tmp_path / "part-*.tfrecord")
  ids = lambda: [v for v, _ in input_pipeline.read_ids_and_labels(pattern, small_config())]
  # Evaluation, prediction and scoring read every file once, to its end. (Training, which
  # repeats its files in shuffled order, reads the file as one record shorter.)
  for message in (eval_error(small_config(), pattern), first_error(ids)):
    assert message == (
      f"{path}: truncated tfrecord file (its records end at byte {last_record} of its "
      f"{last_record + 5} bytes; cut short, or followed by other bytes?)"
    )
  # A last file that is cut is found too; one cut off by eval.max_examples is not damaged.
  one = str(path)
  assert eval_error(small_config(), one).startswith(f"{path}: truncated tfrecord file")
  read = input_pipeline.make_eval_iterator(small_config(), one, 2, max_examples=1)
  assert sum(int(b["valid"].sum()) for b in read) == 1


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
  assert why.startswith("no 'rgb' frames (is this frame-level data?")


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
  assert message.startswith(f"{path}: feature 'labels' ") and "expected int64 values" in message


def _float_frames() -> bytes:
  """A SequenceExample whose frames are float lists (dequantized), not uint8 byte strings."""
  example = tf.train.SequenceExample()
  example.context.feature["id"].bytes_list.value.append(b"f")
  for key, size in (("rgb", D), ("audio", A)):
    example.feature_lists.feature_list[key].feature.add().float_list.value.extend([0.5] * size)
  return example.SerializeToString()


def test_features_of_another_value_type_are_one_line_naming_the_file(tmp_path):
  frames = write(tmp_path / "floats-0.tfrecord", [_float_frames()])
  for message in (eval_error(small_config(), frames), train_error(small_config(), frames)):
    assert message.startswith(f"{frames}: feature '")  # rgb or audio, whichever is parsed first.
    assert message.endswith(
      "expected bytes (frame-level: one uint8 string per frame, data.format='frame')"
    )
  # Video-level parse errors name no file in TensorFlow's text: the file is found by reading
  # the files one by one, so the bad one is named even behind a good one.
  bad = tf.train.Example()
  bad.features.feature["mean_rgb"].bytes_list.value.append(b"\0" * D)
  bad.features.feature["mean_audio"].float_list.value.extend([0.0] * A)
  good = video_record("ok", np.zeros(D), np.zeros(A), [1])
  write(tmp_path / "v-0.tfrecord", [good])
  path = write(tmp_path / "v-1.tfrecord", [good, bad.SerializeToString()])
  pattern = str(tmp_path / "v-*.tfrecord")
  for message in (
    eval_error(small_config("video"), pattern),
    train_error(small_config("video"), pattern),
  ):
    assert message == (
      f"{path}: feature 'mean_rgb' holds bytes values; expected floats (video-level, "
      "data.format='video')"
    )


def test_a_frame_with_two_values_is_one_line_naming_the_file(tmp_path):
  record = tf.train.SequenceExample()
  record.context.feature["id"].bytes_list.value.append(b"v")
  for key, size in (("rgb", D), ("audio", A)):
    frame = record.feature_lists.feature_list[key].feature.add()
    frame.bytes_list.value.extend([bytes(size)] * (2 if key == "audio" else 1))
  path = write(tmp_path / "two-0.tfrecord", [record.SerializeToString()])
  assert eval_error(small_config(), path) == (
    f"{path}: frame 0 of feature 'audio' holds 2 values; the official format has one bytes "
    "value per frame"
  )


def test_read_ids_and_labels_checks_label_range(tmp_path):
  path = write(tmp_path / "l.tfrecord", [frame_record("v", *video(2), [3, 12])])
  with pytest.raises(DataError, match=f"^{path}: video 'v': label 12 is outside \\[0, 10\\)"):
    list(input_pipeline.read_ids_and_labels(path, small_config()))


def test_invalid_data_config_is_a_config_error(tmp_path):
  path = write(tmp_path / "v.tfrecord", [frame_record("v", *video(2), [1])])
  config = small_config()
  config.data.format = "frames"
  with pytest.raises(ConfigError, match="data.format='frames'; allowed: frame, video"):
    input_pipeline.make_eval_iterator(config, path, 2)


def test_an_eval_file_is_checked_and_an_unlabelled_one_warned_about_at_start_up(
  tmp_path, monkeypatch
):
  """The first evaluation, hours into a run, used to be the first to read the eval files."""
  from mfb_jax import evaluate

  warnings = []
  monkeypatch.setattr(evaluate.logging, "warning", lambda *args: warnings.append(args))
  labelled = write(tmp_path / "a.tfrecord", [frame_record("a", *video(5), [3])])
  test_shard = [frame_record(f"b{i}", *video(5), []) for i in range(3)]
  unlabelled = write(tmp_path / "b.tfrecord", test_shard)
  evaluate.check_eval_file(small_config(), labelled)
  assert warnings == []
  evaluate.check_eval_file(small_config(), unlabelled)
  assert len(warnings) == 1 and warnings[0][1:] == (3, unlabelled)
  good_then_wide = [frame_record("a", *video(5), [3]), frame_record("c", *video(5), [3, 12])]
  wide = write(tmp_path / "c.tfrecord", good_then_wide)
  with pytest.raises(DataError, match=r"c.tfrecord: video 'c': label 12 is outside \[0, 10\)"):
    evaluate.check_eval_file(small_config(), wide)
  config = small_config()
  config.eval.max_examples = 1  # The evaluation reads only the first video: so does the check.
  evaluate.check_eval_file(config, wide)
  with pytest.raises(
    DataError, match=r"a.tfrecord: video 'a': no feature 'mean_rgb' \(is this video-level"
  ):
    evaluate.check_eval_file(small_config("video"), labelled)


def test_a_file_named_twice_is_read_once_and_a_video_met_twice_is_refused(tmp_path):
  from mfb_jax import evaluate

  config = small_config()
  config.eval.batch_size = 4
  records = [frame_record(f"v{i}", *video(5, seed=i), [i % 10]) for i in range(6)]
  first = write(tmp_path / "a.tfrecord", records)
  (tmp_path / "sub").mkdir()
  os.symlink(first, tmp_path / "link.tfrecord")
  aliases = f"{first},{tmp_path}/sub/../a.tfrecord,{tmp_path}/link.tfrecord"
  assert input_pipeline.list_files(aliases) == [first]
  ids = [i for b in evaluate.local_batches(config, aliases) for i in b["id"][b["valid"] > 0]]
  assert ids == [f"v{i}" for i in range(6)]
  write(tmp_path / "copy.tfrecord", records[4:])  # Another file holding two of the videos.
  with pytest.raises(DataError, match=r"video id 'v4' appears twice in the files matching"):
    list(evaluate.local_batches(config, f"{first},{tmp_path}/copy.tfrecord"))
