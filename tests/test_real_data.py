"""Real YouTube-8M sample data end to end through launch.py: train, eval, predict with names."""

import csv
import json
import os

import pytest
from conftest import REPO, launch

SAMPLE = REPO.parent / "shared" / "yt8m_sample"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"no sample data at {SAMPLE}")


def _rows(path) -> list[list[str]]:
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_2017_video_level_sample_trains_evaluates_and_predicts_with_names(tmp_path):
  args = [
    f"--config={REPO / 'configs' / 'yt8m_2017_sample.py'}:concat",
    "--config.train.num_steps=4",
    "--config.train.eval_every=4",
    "--config.train.batch_size=32",
    "--config.eval.batch_size=128",
  ]
  result = launch(tmp_path, *args)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / "eval_results.json") as f:
    assert json.load(f)["num_examples"] == 661  # validatea5 + validatea6.
  result = launch(tmp_path, "--mode=predict", *args)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = _rows(tmp_path / "predictions.csv")
  assert len(rows) == 662 and rows[0] == ["VideoId", "LabelConfidencePairs"]
  assert all(len(r[0]) == 11 for r in rows[1:])  # Real YouTube ids of the 2017 validate shards.
  named = _rows(tmp_path / "predictions_named.csv")
  assert named[0] == ["VideoId", "Labels"] and len(named) == 662
  with open(SAMPLE / "label_names.csv", newline="") as f:
    names = {int(r["label_id"]): r["label_name"] for r in csv.DictReader(f)}
  first_label = int(rows[1][1].split()[0])
  assert named[1][1].startswith(f"{names[first_label]} (")


def test_2018_frame_level_record_goes_through_predict(tiny_args, tmp_path):
  result = launch(
    tmp_path, *tiny_args, "--config.train.num_steps=2", "--config.train.eval_every=10"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  record = SAMPLE / "derived_example_frame_level.tfrecord"
  # The real vocabulary's layout, cut to the tiny model's 64 classes (the whole of it names 3862
  # classes, and a vocabulary whose size differs from the model's is refused).
  vocabulary = tmp_path / "vocabulary_64.csv"
  with open(SAMPLE / "vocabulary.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  with open(vocabulary, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows[:65])  # The header and the ids 0-63 (the file's first rows).
  result = launch(
    tmp_path,
    "--mode=predict",
    *tiny_args,
    f"--config.data.predict_pattern={record}",
    f"--config.predict.vocabulary={vocabulary}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  rows = _rows(tmp_path / "predictions.csv")
  assert [r[0] for r in rows[1:]] == ["SjJ3"]
  assert len(rows[1][1].split()) == 40
  named = _rows(tmp_path / "predictions_named.csv")
  assert named[1][0] == "SjJ3" and named[1][1].count("(") == 20
  assert f"wrote {tmp_path}/predictions_named.csv (label names)" in result.stdout


def test_a_missing_vocabulary_fails_before_predicting(tiny_args, tmp_path):
  result = launch(
    tmp_path, "--mode=predict", *tiny_args, "--config.predict.vocabulary=/no/vocab.csv"
  )
  assert result.returncode == 2 and "/no/vocab.csv" in result.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "predictions.csv")
