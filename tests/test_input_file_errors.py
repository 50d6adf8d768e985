"""Bad input files and patterns: missing, empty, damaged or unreadable files, unlabelled eval files,
files and videos met twice, bad data configs. Each is one line naming the problem."""

import gzip
import os

import pytest
import tensorflow as tf
from pipeline_fakes import (
  eval_error,
  first_error,
  small_config,
  train_error,
  video,
  write,
  write_shards,
)

from mfb_jax import errors, evaluate, file_patterns, input_files, input_pipeline
from mfb_jax.bench_input import frame_record
from mfb_jax.errors import ConfigError, DataError


def test_file_patterns(tmp_path):
  write_shards(tmp_path, [1])
  good = str(tmp_path / "part-*.tfrecord")
  with pytest.raises(DataError, match="no file matches '.*nothing-here-\\*'"):
    input_files.list_files(f"{good},{tmp_path}/nothing-here-*")
  with pytest.raises(DataError, match="empty file pattern"):
    input_files.list_files(" , ")
  (tmp_path / "part-9.tfrecord").write_bytes(b"")
  with pytest.raises(DataError, match="part-9.tfrecord is empty \\(0 bytes\\)"):
    input_files.list_files(good)
  assert input_files.list_files(good, 0, 2) == [str(tmp_path / "part-0.tfrecord")]
  (tmp_path / "part-9.tfrecord").unlink()
  (tmp_path / "part-9.tfrecord").symlink_to(tmp_path / "gone.tfrecord")
  with pytest.raises(DataError, match="part-9.tfrecord: cannot read tfrecord file"):
    input_files.list_files(good)


def test_a_comma_inside_a_glob_bracket_belongs_to_it(tmp_path):
  assert file_patterns.split(" a, /d/[0,5]x ,, [],]y,[!,]z, b[,c ") == [
    "a",
    "/d/[0,5]x",
    "[],]y",
    "[!,]z",
    "b[",  # An unclosed bracket is no bracket expression: the comma splits.
    "c",
  ]
  # Classes and '^' inside a bracket, as glibc's fnmatch reads them; an escaped '[' is a literal.
  assert file_patterns.split("p[[:digit:],]x,p[^,]y,pa\\[,pb]") == [
    "p[[:digit:],]x",
    "p[^,]y",
    "pa\\[",
    "pb]",
  ]
  # A backslash inside a bracket escapes the next character: '[\],]' holds ']' and ','.
  assert file_patterns.split("p[\\],]x,q") == ["p[\\],]x", "q"]
  write_shards(tmp_path, [1, 1, 1])
  assert input_files.list_files(str(tmp_path / "part-[0,2].tfrecord")) == [
    str(tmp_path / "part-0.tfrecord"),
    str(tmp_path / "part-2.tfrecord"),
  ]


def test_a_leading_tilde_is_the_home_directory(tmp_path, monkeypatch):
  write_shards(tmp_path, [1])
  monkeypatch.setenv("HOME", str(tmp_path))
  assert input_files.list_files("~/part-*.tfrecord") == [str(tmp_path / "part-0.tfrecord")]
  with pytest.raises(DataError, match=f"^no file matches '~/gone/x\\*' \\({tmp_path}/gone does"):
    input_files.list_files("~/gone/x*")


def test_listing_errors_name_the_field_of_the_pattern(tmp_path):
  config = small_config()
  with pytest.raises(DataError) as info:
    evaluate.local_batches(config, f"{tmp_path}/none-*", source="data.predict_pattern")
  assert str(info.value).startswith(f"data.predict_pattern: no file matches '{tmp_path}/none-*'")
  with pytest.raises(DataError, match="^data.eval_pattern: no file matches"):
    evaluate.local_batches(config, f"{tmp_path}/none-*")
  with pytest.raises(errors.UnlabelledError, match="^--x: no labels$"):  # The type is kept.
    with errors.about("--x"):
      raise errors.UnlabelledError("no labels")
  with pytest.raises(ConfigError, match="^bad$"):  # Other errors pass unchanged.
    with errors.about("--x"):
      raise ConfigError("bad")


def test_a_glob_in_an_unreadable_directory_says_so(tmp_path, monkeypatch):
  # TensorFlow's glob sees no files in a directory it cannot read. (Tests run as root, who reads
  # any directory, so the permission check itself is faked for that one directory.)
  locked = tmp_path / "locked"
  (locked / "sub").mkdir(parents=True)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(locked) and real_access(p, mode))
  for pattern in (f"{locked}/*.tfrecord", f"{locked}/sub/part-[0-9]*", f"{locked}/gone/x"):
    with pytest.raises(DataError, match=f"directory {locked} cannot be read: permission denied"):
      input_files.list_files(pattern)
  with pytest.raises(DataError, match=r"no file matches '.*nothing-\*'$"):  # A readable one.
    input_files.list_files(f"{tmp_path}/nothing-*")


def test_a_glob_in_a_missing_directory_names_it(tmp_path):
  # A config's default data directory absent in this checkout (configs/yt8m_2017_sample.py
  # outside its usual place) read as a glob that matched nothing.
  (tmp_path / "a_file").write_text("")
  for pattern, named in [
    (f"{tmp_path}/gone/deeper/x-*.tfrecord", f"{tmp_path}/gone does not exist"),
    (f"{tmp_path}/a_file/sub/x", f"{tmp_path}/a_file is not a directory"),
  ]:
    with pytest.raises(DataError) as error:
      input_files.list_files(pattern)
    assert str(error.value) == f"no file matches {pattern!r} ({named})"
  with pytest.raises(DataError, match=r"'$"):  # A directory that is itself a glob: no claim.
    input_files.list_files(f"{tmp_path}/gone[0-9]/x")


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

  warnings = []
  monkeypatch.setattr(evaluate.logging, "warning", lambda *args: warnings.append(args))
  labelled = write(tmp_path / "a.tfrecord", [frame_record("a", *video(5), [3])])
  test_shard = [frame_record(f"b{i}", *video(5), []) for i in range(3)]
  unlabelled = write(tmp_path / "b.tfrecord", test_shard)
  evaluate.check_eval_files(small_config(), [labelled])
  assert warnings == []
  evaluate.check_eval_files(small_config(), [unlabelled])
  assert len(warnings) == 1 and warnings[0][1:] == (3, unlabelled)
  good_then_wide = [frame_record("a", *video(5), [3]), frame_record("c", *video(5), [3, 12])]
  wide = write(tmp_path / "c.tfrecord", good_then_wide)
  with pytest.raises(DataError, match=r"c.tfrecord: video 'c': label 12 is outside \[0, 10\)"):
    evaluate.check_eval_files(small_config(), [wide])
  config = small_config()
  config.eval.max_examples = 1  # The evaluation reads only the first video: so does the check.
  evaluate.check_eval_files(config, [wide])
  with pytest.raises(
    DataError, match=r"a.tfrecord: video 'a': no feature 'mean_rgb' \(is this video-level"
  ):
    evaluate.check_eval_files(small_config("video"), [labelled])
  misnamed = small_config()
  misnamed.data.id_feature = "xid"  # Its first evaluation would stop the run (_unique_ids).
  with pytest.raises(DataError, match=r"a.tfrecord' has no id \(data.id_feature='xid'"):
    evaluate.check_eval_files(misnamed, [labelled])
  # A first file without a record (an empty GZIP stream, as a writer leaves a shard it gave no
  # video) was the whole check: the bad file after it stopped the run at its first evaluation.
  empty = tmp_path / "0-empty.tfrecord"
  empty.write_bytes(gzip.compress(b""))
  with pytest.raises(DataError, match=r"c.tfrecord: video 'c': label 12 is outside"):
    evaluate.check_eval_files(small_config(), [str(empty), wide])
  warnings.clear()
  evaluate.check_eval_files(small_config(), [str(empty), unlabelled, labelled])
  assert warnings == []  # The 4 videos read include a.tfrecord's labelled one.
  evaluate.check_eval_files(small_config(), [str(empty), unlabelled])
  assert len(warnings) == 1 and warnings[0][1:] == (3, unlabelled)  # The file of the videos.
  with pytest.raises(DataError, match=r"a video in '.*/a.tfrecord' has no id"):
    evaluate.check_eval_files(misnamed, [str(empty), labelled])
  with pytest.raises(
    DataError, match=r"^data.eval_pattern: no videos to evaluate: no record in its 2 files, "
  ):
    evaluate.check_eval_files(small_config(), [str(empty), str(empty)])


def test_a_file_named_twice_is_read_once_and_a_video_met_twice_is_refused(tmp_path):

  config = small_config()
  config.eval.batch_size = 4
  records = [frame_record(f"v{i}", *video(5, seed=i), [i % 10]) for i in range(6)]
  first = write(tmp_path / "a.tfrecord", records)
  (tmp_path / "sub").mkdir()
  os.symlink(first, tmp_path / "link.tfrecord")
  aliases = f"{first},{tmp_path}/sub/../a.tfrecord,{tmp_path}/link.tfrecord"
  assert input_files.list_files(aliases) == [first]
  ids = [i for b in evaluate.local_batches(config, aliases) for i in b["id"][b["valid"] > 0]]
  assert ids == [f"v{i}" for i in range(6)]
  copy = write(tmp_path / "copy.tfrecord", records[4:])  # Another file holding two videos.
  with pytest.raises(DataError) as error:
    list(evaluate.local_batches(config, f"{first},{copy}"))
  assert str(error.value) == (
    f"video id 'v4' of the files matching '{first},{copy}' appears in {first} and in {copy} "
    "(the same videos in two files?)"
  )
  twice = write(tmp_path / "twice.tfrecord", [*records[:3], records[1]])  # Within one file.
  with pytest.raises(DataError, match=rf"'v1' of .* appears twice in {twice} \(a video written"):
    list(evaluate.local_batches(config, twice))
  # A misnamed id feature read every id as '': the duplicate check was off, and eval counted
  # the two videos twice.
  config.data.id_feature = "xid"
  with pytest.raises(DataError, match=r"has no id \(data.id_feature='xid'; 'auto' reads 'id'"):
    list(evaluate.local_batches(config, f"{first},{tmp_path}/copy.tfrecord"))
  config.data.id_feature = "auto"  # Records without any id: eval goes on without them.
  unnamed = [frame_record("", *video(5, seed=i), [i % 10]) for i in range(3)]
  batches = evaluate.local_batches(config, write(tmp_path / "unnamed.tfrecord", unnamed))
  assert sum(int(b["valid"].sum()) for b in batches) == 3
