"""Scoring Kaggle-format prediction CSVs: hand-worked values, bad input, the command line."""

import csv
import json
import os
import threading
import time

import pytest
from conftest import run_python
from test_metrics import LABEL_IDS, LABELS, PROBS

from mfb_jax import metrics, score_csv
from mfb_jax.errors import DataError

HEADER = "VideoId,LabelConfidencePairs\n"
# The fake model's predictions of tests/test_metrics.py, pairs deliberately out of order; video D
# (no labels) is missing from the CSV.
ROWS = (
  'A,"1 0.8 0 0.9 2 0.1"\nB,"0 0.2 1 0.7 2 0.6 3 0.3 4 0.1"\nC,"0 0.8 1 0.1 2 0.05 3 0.5 4 0.4"\n'
)
LABELED = list(zip("ABCD", LABEL_IDS, strict=True))


def write(tmp_path, text, name="predictions.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_missing_video_counts_with_no_predictions(tmp_path):
  predictions = score_csv.read_predictions(write(tmp_path, HEADER + ROWS), num_classes=6)
  result = score_csv.score(predictions, LABELED, num_classes=6, top_k=2)
  # Without D's two misses (0.9, 0.6) the pool ranks: 0.9 hit (1/1); 0.8 {miss, hit} tied after
  # 1 pair and 1 hit: (1/2)(2/2) + (1/2)(2/3) = 5/6; 0.7 hit (3/4); 0.6 hit (4/5); 0.5 miss.
  # GAP = (1 + 5/6 + 3/4 + 4/5) / 7 = (203/60) / 7 = 29/60.
  assert result["gap"] == pytest.approx(29 / 60, abs=1e-12)
  # mAP: c0 1, c1 1/2, c2 (0.6 hit of 2 positives) 1/2, c3 0, c4 0 -> 2/5.
  assert result["map"] == pytest.approx(2 / 5, abs=1e-12)
  assert result["hit_at_1"] == pytest.approx(3 / 4)  # D has no prediction, so no hit.
  assert result["perr"] == pytest.approx(2 / 3)
  assert (result["num_examples"], result["num_predicted"], result["top_k"]) == (4, 3, 2)


def test_full_csv_scores_like_the_model_path(tmp_path):
  lines = [
    f'{v},"{" ".join(f"{c} {p!r}" for c, p in enumerate(row.tolist()))}"'
    for v, row in zip("ABCD", PROBS, strict=True)
  ]
  predictions = score_csv.read_predictions(write(tmp_path, HEADER + "\n".join(lines) + "\n"), 6)
  from_csv = score_csv.score(predictions, LABELED, num_classes=6, top_k=2)
  from_model = metrics.evaluate(PROBS, LABELS, top_k=2)
  assert {k: from_csv[k] for k in from_model} == from_model


def test_fewer_pairs_than_labels_counts_only_the_given_pairs(tmp_path):
  text = HEADER + 'B,"1 0.7 2 0.6"\n'  # B has 3 labels; its third prediction is missing.
  predictions = score_csv.read_predictions(write(tmp_path, text), 6)
  result = score_csv.score(predictions, [("B", [1, 2, 3])], num_classes=6, top_k=20)
  assert result["perr"] == pytest.approx(2 / 3)
  assert result["gap"] == pytest.approx((1 + 1) / 3)  # Two hits at ranks 1, 2 of 3 positives.
  assert result["top_k"] == 6  # k is capped at the number of classes.


@pytest.mark.parametrize(
  "text, message",
  [
    ("id,pairs\n", r":1: expected header"),
    (HEADER + 'A,"1 0.8"\nB,"1 0.8 2"\n', r":3: odd number"),
    (HEADER + 'A,"1 0.8"\nB,"x 0.8"\n', r":3: expected integer labels"),
    (HEADER + 'A,"1 0.8"\n\nB,"9 0.8"\n', r":4: label 9 is outside \[0, 6\)"),
    (HEADER + 'A,"1 0.8"\nA,"2 0.8"\n', r":3: video id 'A' appears twice"),
    (HEADER + 'A,"1 nan"\n', r":2: scores must be finite"),
    (HEADER + 'A,"1 0.8",x\n', r":2: expected 'VideoId"),
  ],
)
def test_malformed_csv_names_the_line(tmp_path, text, message):
  with pytest.raises(DataError, match=message):
    score_csv.read_predictions(write(tmp_path, text), num_classes=6)


def test_unknown_csv_ids_are_named(tmp_path):
  text = HEADER + ROWS + 'Z1,"1 0.5"\nZ2,"1 0.5"\nZ3,"1 0.5"\nZ4,"1 0.5"\n'
  predictions = score_csv.read_predictions(write(tmp_path, text), 6)
  with pytest.raises(
    DataError,
    match=r"^4 video ids in the predictions are not in the labels, e.g. 'Z1', 'Z2', 'Z3'$",
  ):
    score_csv.score(predictions, LABELED, num_classes=6, top_k=2)


def test_labels_outside_num_classes_are_an_error():
  with pytest.raises(DataError, match=r"video 'A': label 7 is outside \[0, 6\)"):
    score_csv.score({}, [("A", [7])], num_classes=6, top_k=2)
  with pytest.raises(DataError, match="a video in the labels has no id"):
    score_csv.score({}, [("", [1]), ("", [2])], num_classes=6, top_k=2)


def _raw(video_id: str | bytes) -> bytes:
  return video_id if isinstance(video_id, bytes) else video_id.encode()


def write_frame_level_records(path, videos):
  """SequenceExamples with the 2018 frame-level schema (context id, labels; rgb, audio frames)."""
  import tensorflow as tf

  with tf.io.TFRecordWriter(str(path)) as writer:
    for video_id, label_ids in videos:
      frame = lambda size: tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(size)]))
      example = tf.train.SequenceExample(
        context=tf.train.Features(
          feature={
            "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_raw(video_id)])),
            "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=label_ids)),
          }
        ),
        feature_lists=tf.train.FeatureLists(
          feature_list={
            "rgb": tf.train.FeatureList(feature=[frame(1024)] * 2),
            "audio": tf.train.FeatureList(feature=[frame(128)] * 2),
          }
        ),
      )
      writer.write(example.SerializeToString())


def test_command_line_on_tfrecords(tmp_path, capsys):
  write_frame_level_records(tmp_path / "labels-0.tfrecord", LABELED[:2])
  write_frame_level_records(tmp_path / "labels-1.tfrecord", LABELED[2:])
  args = [f"--labels={tmp_path / 'labels-*.tfrecord'}", "--num_classes=6", "--top_k=2"]
  assert score_csv.main([f"--predictions={write(tmp_path, HEADER + ROWS)}", *args]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["gap"] == pytest.approx(29 / 60) and result["num_examples"] == 4
  unknown = write(tmp_path, HEADER + 'Q,"1 0.5"\n', "unknown.csv")
  assert score_csv.main([f"--predictions={unknown}", *args]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "'Q'" in err
  # A label beyond --num_classes in the tfrecords was blamed on data.num_classes, a launch.py field.
  args[1] = "--num_classes=3"
  few = write(tmp_path, HEADER + 'A,"1 0.5"\n', "few.csv")
  assert score_csv.main([f"--predictions={few}", *args]) == 1
  assert "is outside [0, 3) (--num_classes=3)" in capsys.readouterr().err


def test_label_files_with_a_video_twice_or_without_an_id_are_named(tmp_path):
  # Neither line named a file: 'video id 'A' appears twice in the labels'.
  predictions = write(tmp_path, HEADER + ROWS)
  first, second = tmp_path / "labels-0.tfrecord", tmp_path / "labels-1.tfrecord"
  write_frame_level_records(first, LABELED[:2])
  write_frame_level_records(second, [LABELED[2], LABELED[0]])
  labels = str(tmp_path / "labels-*.tfrecord")
  with pytest.raises(DataError) as error:
    score_csv.score_files(predictions, labels, 6, 2)
  assert (
    str(error.value) == f"video id 'A' appears twice in the labels (in {first} and in {second})"
  )
  write_frame_level_records(second, [LABELED[2], LABELED[2]])
  with pytest.raises(
    DataError, match=rf"^video id 'C' appears twice in the labels \(in {second}\)$"
  ):
    score_csv.score_files(predictions, labels, 6, 2)
  write_frame_level_records(second, [LABELED[2], ("", [1])])
  with pytest.raises(DataError, match=rf"^{second}: a video in the labels has no id \(its 'id'"):
    score_csv.score_files(predictions, labels, 6, 2)


def test_ids_as_the_files_hold_them_round_trip_through_eval_and_the_metrics_cli(tmp_path, capsys):
  """Ids that were not UTF-8 collapsed into one ('appears twice'), the scorer stripped the spaces
  that predict writes, and an id with a newline made its error two lines."""
  from pipeline_fakes import small_config

  from mfb_jax import evaluate

  ids = [b"\xff\xfeA", b"\xfe\xfeA", b" lead", b"trail ", "caf\u00e9".encode()]
  write_frame_level_records(tmp_path / "v.tfrecord", [(i, [1]) for i in ids])
  config = small_config()
  config.data.update(num_classes=6, rgb_size=1024, audio_size=128)
  batches = evaluate.local_batches(config, str(tmp_path / "v.tfrecord"))
  seen = [i for b in batches for i in b["id"][b["valid"] > 0]]
  assert seen == ["\\xff\\xfeA", "\\xfe\\xfeA", " lead", "trail ", "caf\u00e9"]
  with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:  # As predict writes.
    csv.writer(f, lineterminator="\n").writerows(
      [HEADER.strip().split(",")] + [[i, "1 0.9"] for i in seen]
    )
  args = [f"--predictions={tmp_path / 'p.csv'}", f"--labels={tmp_path / 'v.tfrecord'}"]
  assert score_csv.main([*args, "--num_classes=6"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["num_examples"] == result["num_predicted"] == 5 and result["gap"] == 1.0
  write_frame_level_records(tmp_path / "v.tfrecord", [(b"new\nline", [7])])
  assert score_csv.main([*args, "--num_classes=6"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "video 'new line': label 7 is outside [0, 6)" in err
  write_frame_level_records(tmp_path / "v.tfrecord", [(ids[0], [7])])  # The same in both lines.
  assert score_csv.main([*args, "--num_classes=6"]) == 1
  assert "video '\\xff\\xfeA': label 7 is outside" in capsys.readouterr().err
  with pytest.raises(DataError, match=r"video '\\xff\\xfeA': label 7 is outside \[0, 6\)"):
    list(evaluate.local_batches(config, str(tmp_path / "v.tfrecord")))
  import tensorflow as tf

  from mfb_jax import tfds_yt8m  # The TFDS builder's ids too (a UnicodeDecodeError before).

  example = tf.train.SequenceExample.FromString((tmp_path / "v.tfrecord").read_bytes()[12:-4])
  assert tfds_yt8m._id_and_labels(example.context.feature)["id"] == "\\xff\\xfeA"


def test_a_corrupt_labels_file_is_one_line(tmp_path):
  # absl's note "corrupt tfrecord data: reading 2 file(s) one by one" came before the error.
  write_frame_level_records(tmp_path / "labels-0.tfrecord", LABELED[:2])
  write_frame_level_records(tmp_path / "labels-1.tfrecord", LABELED[2:])
  cut = tmp_path / "labels-1.tfrecord"
  cut.write_bytes(cut.read_bytes()[:-7])
  csv_path = write(tmp_path, HEADER + ROWS)
  args = [f"--predictions={csv_path}", f"--labels={tmp_path / 'labels-*'}", "--num_classes=6"]
  result = run_python(["-m", "mfb_jax.metrics", *args])
  assert result.returncode == 1
  assert result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith("error: ") and "labels-1.tfrecord" in result.stderr


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path):
  missing = tmp_path / "nope.csv"
  result = run_python(["-m", "mfb_jax.metrics", f"--predictions={missing}", "--labels=x"])
  assert result.returncode == 1
  assert result.stderr.strip() == f"error: {missing}: predictions file not found"
  assert result.stdout == ""


def test_a_directory_a_byte_order_mark_and_a_csv_without_rows(tmp_path, capsys):
  (tmp_path / "dir.csv").mkdir()  # Was a traceback (IsADirectoryError).
  with pytest.raises(DataError, match=r"dir.csv: cannot read the predictions file \(Is a dir"):
    score_csv.read_predictions(str(tmp_path / "dir.csv"), 6)
  # Excel's "CSV UTF-8" starts with a byte-order mark, which was read as part of 'VideoId'.
  (tmp_path / "bom.csv").write_text("\ufeff" + HEADER + ROWS, encoding="utf-8")
  bom = score_csv.read_predictions(str(tmp_path / "bom.csv"), 6)
  plain = score_csv.read_predictions(write(tmp_path, HEADER + ROWS), 6)
  assert bom.keys() == plain.keys() == {"A", "B", "C"}
  write_frame_level_records(tmp_path / "labels.tfrecord", LABELED)
  args = [f"--labels={tmp_path / 'labels.tfrecord'}", "--num_classes=6", "--top_k=2"]
  assert score_csv.main([f"--predictions={write(tmp_path, HEADER, 'empty.csv')}", *args]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["gap"] == 0.0
  assert captured.err == f"warning: {tmp_path / 'empty.csv'} has no rows: every video scores 0\n"


def test_a_gzipped_csv_scores_as_the_plain_one(tmp_path):
  # Kaggle submissions are often gzipped; 'predictions.csv.gz' was "not a readable CSV file".
  import gzip

  plain = score_csv.read_predictions(write(tmp_path, HEADER + ROWS), 6)
  with gzip.open(tmp_path / "predictions.csv.gz", "wt", encoding="utf-8") as f:
    f.write("\ufeff" + HEADER + ROWS)
  packed = score_csv.read_predictions(str(tmp_path / "predictions.csv.gz"), 6)
  assert packed.keys() == plain.keys() == {"A", "B", "C"}
  for video, (classes, scores) in plain.items():
    assert (packed[video][0] == classes).all() and (packed[video][1] == scores).all()
  # Read through a pipe (`--predictions=<(zcat p.csv.gz)`): a first look at the magic bytes
  # consumed the stream ("found None").
  for name, data in (("plain", HEADER + ROWS), ("packed", None)):
    fifo = tmp_path / f"{name}.fifo"
    os.mkfifo(fifo)
    data = (tmp_path / "predictions.csv.gz").read_bytes() if data is None else data.encode()
    read = {}
    target = lambda read=read, fifo=fifo: read.update(score_csv.read_predictions(str(fifo), 6))
    reader = threading.Thread(target=target, daemon=True)
    reader.start()
    with open(fifo, "wb") as f:  # In two writes: one byte, then the rest.
      f.write(data[:1])
      f.flush()
      time.sleep(0.2)
      f.write(data[1:])
    reader.join(timeout=30)  # A second open of the FIFO waits for a writer for good.
    assert not reader.is_alive() and read.keys() == {"A", "B", "C"}
  cut = (tmp_path / "predictions.csv.gz").read_bytes()[:30]  # A download cut short.
  (tmp_path / "cut.csv.gz").write_bytes(cut)
  with pytest.raises(DataError, match=r"cut.csv.gz: not a readable CSV file \("):
    score_csv.read_predictions(str(tmp_path / "cut.csv.gz"), 6)
