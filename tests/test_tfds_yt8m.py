"""TFDS builder: tfds.load of tiny official-format shards from a manual dir."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mfb_jax import tfds_yt8m
from mfb_jax.bench_input import frame_record, video_record
from mfb_jax.errors import DataError


def write(path, records: list[bytes]) -> None:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in records:
      writer.write(record)


def test_tfds_load_reads_frame_and_video_records(tmp_path):
  rng = np.random.default_rng(0)
  frames = {}
  for name, num_frames in (("a", 3), ("b", 1), ("c", 2)):
    frames[name] = (
      rng.integers(0, 256, (num_frames, 1024), dtype=np.uint8),
      rng.integers(0, 256, (num_frames, 128), dtype=np.uint8),
    )
  manual = tmp_path / "frame"
  manual.mkdir()
  write(manual / "train0.tfrecord", [frame_record("a", *frames["a"], [5, 3861])])
  write(manual / "train1.tfrecord", [frame_record("b", *frames["b"], [])])
  write(manual / "validate0.tfrecord", [frame_record("c", *frames["c"], [0])])
  config = tfds.download.DownloadConfig(manual_dir=str(manual))
  kwargs = dict(
    data_dir=str(tmp_path / "tfds"), download_and_prepare_kwargs={"download_config": config}
  )
  train = tfds.load(f"{tfds_yt8m.Yt8mRecords.name}/frame", split="train", **kwargs)
  got = {ex["id"].decode(): ex for ex in tfds.as_numpy(train)}
  assert sorted(got) == ["a", "b"]
  for name in got:
    np.testing.assert_array_equal(got[name]["rgb"], frames[name][0])
    np.testing.assert_array_equal(got[name]["audio"], frames[name][1])
  assert sorted(got["a"]["labels"].tolist()) == [5, 3861] and got["b"]["labels"].size == 0
  (validation,) = tfds.as_numpy(tfds.load("yt8m_records/frame", split="validation", **kwargs))
  assert validation["id"] == b"c" and validation["rgb"].shape == (2, 1024)

  manual_2017 = tmp_path / "video"
  manual_2017.mkdir()
  mean_rgb, mean_audio = rng.normal(size=1024), rng.normal(size=128)
  write(
    manual_2017 / "test0.tfrecord", [video_record("v1", mean_rgb, mean_audio, [4715], "video_id")]
  )
  config = tfds.download.DownloadConfig(manual_dir=str(manual_2017))
  kwargs["download_and_prepare_kwargs"] = {"download_config": config}
  (test,) = tfds.as_numpy(tfds.load("yt8m_records/video_2017", split="test", **kwargs))
  assert test["id"] == b"v1" and test["labels"].tolist() == [4715]
  np.testing.assert_allclose(test["mean_rgb"], mean_rgb.astype(np.float32))
  np.testing.assert_allclose(test["mean_audio"], mean_audio.astype(np.float32))


def test_a_truncated_shard_and_frame_data_read_as_video_name_the_problem(tmp_path):
  rng = np.random.default_rng(0)
  rgb, audio = rng.integers(0, 256, (3, 1024), np.uint8), rng.integers(0, 256, (3, 128), np.uint8)
  manual = tmp_path / "frame"
  manual.mkdir()
  write(manual / "validate0.tfrecord", [frame_record(f"v{i}", rgb, audio, [1]) for i in range(3)])
  whole = (manual / "validate0.tfrecord").read_bytes()
  (manual / "validate0.tfrecord").write_bytes(whole[: len(whole) - 100])
  kwargs = dict(
    data_dir=str(tmp_path / "tfds"),
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=str(manual))
    },
  )
  # TensorFlow's DataLossError named no file.
  with pytest.raises(DataError, match=r"validate0.tfrecord: corrupt or truncated tfrecord file"):
    tfds.load("yt8m_records/frame", split="validation", **kwargs)
  (manual / "validate0.tfrecord").write_bytes(whole)
  with pytest.raises(DataError, match=r"'mean_rgb' has 0 values, expected 1024 \(frame-level data"):
    tfds.load("yt8m_records/video", split="validation", **kwargs)
