"""Synthetic YouTube-8M shards: format, determinism, realistic statistics and planted structure."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from mfb_jax import synthetic
from mfb_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=10, num_eval=5, num_shards=3, num_eval_shards=2, num_classes=40)
FRAMES = (5, 40)


def dequantize(q):
  return q.astype(np.float32) * (4.0 / 255.0) - 2.0


def read_records(paths) -> list[bytes]:
  return [r.numpy() for path in paths for r in tf.data.TFRecordDataset(path)]


def parse_frame(record: bytes) -> dict:
  """Parses with the official 2018 frame-level feature names."""
  context, sequence = tf.io.parse_single_sequence_example(
    record,
    context_features={
      "id": tf.io.FixedLenFeature([], tf.string),
      "labels": tf.io.VarLenFeature(tf.int64),
    },
    sequence_features={
      "rgb": tf.io.FixedLenSequenceFeature([], tf.string),
      "audio": tf.io.FixedLenSequenceFeature([], tf.string),
    },
  )
  return {
    "id": context["id"].numpy().decode(),
    "labels": tf.sparse.to_dense(context["labels"]).numpy(),
    "rgb": tf.io.decode_raw(sequence["rgb"], tf.uint8).numpy(),
    "audio": tf.io.decode_raw(sequence["audio"], tf.uint8).numpy(),
  }


def parse_video(record: bytes) -> dict:
  """Parses with the official video-level feature names."""
  features = tf.io.parse_single_example(
    record,
    {
      "id": tf.io.FixedLenFeature([], tf.string),
      "labels": tf.io.VarLenFeature(tf.int64),
      "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
      "mean_audio": tf.io.FixedLenFeature([128], tf.float32),
    },
  )
  return {
    "id": features["id"].numpy().decode(),
    "labels": tf.sparse.to_dense(features["labels"]).numpy(),
    "mean_rgb": features["mean_rgb"].numpy(),
    "mean_audio": features["mean_audio"].numpy(),
  }


def write(tmp_path, name, **kw):
  args = {**SMALL, "frames": FRAMES, **kw}
  return synthetic.write_dataset(str(tmp_path / name), **args)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  first, again, other = (write(tmp_path, n, seed=s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
  names = [Path(p).name for p in first["train"] + first["eval"]]
  assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)] + [
    f"eval-0000{i}-of-00002.tfrecord" for i in range(2)
  ]
  for split in ("train", "eval"):
    for p, q, r in zip(first[split], again[split], other[split], strict=True):
      assert Path(p).read_bytes() == Path(q).read_bytes()
      assert Path(p).read_bytes() != Path(r).read_bytes()


def test_records_do_not_depend_on_the_shard_count(tmp_path):
  three = write(tmp_path, "three", seed=2)["train"]
  one = write(tmp_path, "one", seed=2, num_shards=1)["train"]
  assert len(one) == 1 and read_records(one) == read_records(three)


def test_frame_records_parse_and_match_the_pure_generator(tmp_path):
  paths = write(tmp_path, "f", seed=3)
  world = synthetic.make_world(3, SMALL["num_classes"])
  for split, count in (("train", 10), ("eval", 5)):
    records = [parse_frame(r) for r in read_records(paths[split])]
    assert [r["id"] for r in records] == [f"{split}{i:07d}" for i in range(count)]
    for index, record in enumerate(records):
      video = synthetic.generate_video(world, synthetic.video_rng(3, split, index), *FRAMES)
      T = record["rgb"].shape[0]
      assert record["rgb"].shape == (T, 1024) and record["audio"].shape == (T, 128)
      assert FRAMES[0] <= T <= FRAMES[1]
      np.testing.assert_array_equal(record["rgb"], video.rgb)
      np.testing.assert_array_equal(record["audio"], video.audio)
      np.testing.assert_array_equal(record["labels"], video.labels)


def test_video_level_means_are_the_frame_means_of_the_same_videos(tmp_path):
  frames = write(tmp_path, "f", seed=4)
  means = write(tmp_path, "v", seed=4, fmt="video")
  for split in ("train", "eval"):
    frame_records = [parse_frame(r) for r in read_records(frames[split])]
    video_records = [parse_video(r) for r in read_records(means[split])]
    assert len(frame_records) == len(video_records) == SMALL[f"num_{split}"]
    for f, v in zip(frame_records, video_records, strict=True):
      assert f["id"] == v["id"]
      np.testing.assert_array_equal(f["labels"], v["labels"])
      np.testing.assert_allclose(v["mean_rgb"], dequantize(f["rgb"]).mean(0), atol=2e-6)
      np.testing.assert_allclose(v["mean_audio"], dequantize(f["audio"]).mean(0), atol=2e-6)


def test_label_statistics_of_the_default_world():
  world = synthetic.make_world(0)  # 3862 classes as in the 2018 data.
  labels = [
    synthetic.generate_video(world, synthetic.video_rng(0, "labels", i), 2, 2).labels
    for i in range(1500)
  ]
  counts = np.array([len(x) for x in labels])
  assert 2.7 <= counts.mean() <= 3.3 and counts.min() >= 1 and counts.max() >= 7
  assert 0.15 <= np.mean(counts == 1) <= 0.4  # Real v1 sample: 24% of videos have one label.
  flat = np.concatenate(labels)
  assert all(np.all(np.diff(x) > 0) for x in labels)  # Sorted, no duplicates.
  assert set(flat.tolist()) <= set(world.class_ids.tolist())
  assert flat.min() >= 0 and flat.max() < 3862
  assert 150 <= len(world.class_ids) <= 250  # Most of the 3862 ids never occur.
  assert {len(world.ids(k)) > 10 for k in synthetic.KINDS} == {True}
  # Class frequencies follow the planted prevalences (Zipf-like, top class in ~20% of videos).
  freq = np.bincount(flat, minlength=3862)[world.class_ids] / len(labels)
  assert np.corrcoef(freq, world.prevalence)[0, 1] > 0.95
  assert 0.1 <= freq.max() <= 0.35


def test_value_statistics_like_real_frames():
  world = synthetic.make_world(1)
  videos = [
    synthetic.generate_video(world, synthetic.video_rng(1, "values", i)) for i in range(150)
  ]
  T = np.array([len(v.rgb) for v in videos])
  assert T.min() >= 60 and T.max() <= 300 and T.std() > 40  # Uniform over [60, 300]: std 70.
  for name, frame_std, mean_std in (("rgb", 1.0, 0.47), ("audio", 1.0, 0.68)):
    frames = [dequantize(getattr(v, name)) for v in videos]
    stacked = np.concatenate(frames)
    assert abs(stacked.mean()) < 0.05
    assert abs(stacked.std(0).mean() - frame_std) < 0.12
    # Saturated at 0 or 255: 7% (rgb) and 9% (audio) in the real sample video.
    assert 0.01 < np.mean(np.abs(stacked) > 1.99) < 0.12
    video_means = np.stack([f.mean(0) for f in frames])
    assert abs(video_means.std(0).mean() - mean_std) < 0.06
    # Frames are correlated in time (iid frames would give ~0 at every lag).
    dev = [f - f.mean(0) for f in frames]
    corr = {k: np.mean([np.sum(d[k:] * d[:-k]) / np.sum(d * d) for d in dev]) for k in (1, 2, 30)}
    assert 0.3 < corr[1] < 0.5 and 0.2 < corr[2] < corr[1] and abs(corr[30]) < 0.08


def test_noise_filter_has_the_documented_autocorrelation():
  from mfb_jax import synthetic_world

  rho, weight = 0.75, 0.55
  a, b = synthetic_world._arma_coefficients(rho, weight)
  taps = np.array([a] + [b * rho**k for k in range(1, 16)])
  assert abs(np.sum(taps**2) - 1.0) < 1e-3
  for k in (1, 2, 5):
    assert abs(np.sum(taps[k:] * taps[:-k]) - weight * rho**k) < 2e-3


def test_short_videos_and_bad_worlds(tmp_path):
  world = synthetic.make_world(0, 16)
  for i in range(30):  # Events longer than the video are cut to it.
    video = synthetic.generate_video(world, synthetic.video_rng(0, "short", i), 1, 2)
    assert video.rgb.shape[0] in (1, 2) and video.audio.shape == (video.rgb.shape[0], 128)
  with pytest.raises(ConfigError, match="num_classes=4"):
    synthetic.make_world(0, 4)
  with pytest.raises(ConfigError, match="active_fraction"):
    synthetic.make_world(0, 100, synthetic.Params(active_fraction=0.0))
  with pytest.raises(ConfigError, match="--num_shards=0: must be in"):
    synthetic.write_dataset(str(tmp_path / "none"), num_shards=0)
  assert not (tmp_path / "none").exists()


def _synthetic_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mfb_jax.synthetic", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_command_line_writes_files_progress_and_world_json(tmp_path):
  out, world_json = tmp_path / "d", tmp_path / "world.json"
  flags = ["--num_train=6", "--num_eval=3", "--num_shards=2", "--num_classes=20"]
  frames = ["--min_frames=4", "--max_frames=9", f"--world_json={world_json}"]
  result = _synthetic_cli(f"--output_dir={out}", *flags, *frames)
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout and "videos/s" in result.stdout
  # Records only: launch.py users (and contract_check.sh) glob the whole directory.
  assert sorted(p.name for p in out.iterdir()) == [
    "eval-00000-of-00002.tfrecord",
    "eval-00001-of-00002.tfrecord",
    "train-00000-of-00002.tfrecord",
    "train-00001-of-00002.tfrecord",
  ]
  info = json.loads(world_json.read_text())
  kinds = info["classes_by_kind"]
  assert set(kinds) == set(synthetic.KINDS)
  ids = [i for ids in kinds.values() for i in ids]
  assert len(ids) == len(set(ids)) == 16 and max(ids) < 20  # At least 16 active, disjoint kinds.
  # Another shard layout in the same directory would mix with these under train-*: refused.
  result = _synthetic_cli(f"--output_dir={out}", *flags[:2], "--num_shards=3")
  assert result.returncode != 0 and "another layout" in result.stderr


@pytest.mark.parametrize(
  "bad, expected",
  [
    ("--num_train=-1", "--num_train=-1: must be >= 0"),
    ("--max_frames=10", "--max_frames=10: must be >= 60"),
    ("--num_classes=abc", "--num_classes=abc"),
    # A traceback (numpy's NaN probabilities, a 38 GiB allocation), or accepted (1000 > 193).
    ("--labels_per_video=nan", "labels_per_video=nan: must be in [1, 193], 193 being the number"),
    ("--labels_per_video=1000", "labels_per_video=1000.0: must be in [1, 193]"),
    ("--num_classes=100000000", "--num_classes=100000000: must be <= 1000000"),
  ],
)
def test_bad_flag_is_one_line_and_nonzero_exit(tmp_path, bad, expected):
  result = _synthetic_cli(f"--output_dir={tmp_path}", bad)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
  assert not list(tmp_path.glob("*.tfrecord"))


def test_a_shard_that_cannot_be_written_is_one_line_and_leaves_no_hidden_file(tmp_path):
  # A full disk: a TensorFlow traceback (exit 1), and the hidden .tmp shard left behind.
  out = tmp_path / "d"
  (out / "train-00001-of-00002.tfrecord").mkdir(parents=True)  # Cannot be replaced.
  flags = ["--num_train=4", "--num_eval=0", "--num_shards=2", "--min_frames=2", "--max_frames=3"]
  result = _synthetic_cli(f"--output_dir={out}", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    f"error: writing {out}/train-00001-of-00002.tfrecord failed (Is a directory: "
  )
  assert sorted(p.name for p in out.iterdir()) == [
    "train-00000-of-00002.tfrecord",
    "train-00001-of-00002.tfrecord",
  ]


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_a_signal_is_one_line_and_leaves_no_hidden_shard(tmp_path, signum, code):
  # Ctrl-C printed KeyboardInterrupt's traceback; SIGTERM left the hidden .tmp shard behind.
  import signal
  import time

  out = tmp_path / "d"
  args = [f"--output_dir={out}", "--num_train=4000", "--num_eval=0", "--num_shards=40"]
  process = subprocess.Popen(
    [sys.executable, "-m", "mfb_jax.synthetic", *args],
    cwd=Path(__file__).parents[1],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # Its own signal disposition, whatever the test runner's.
  )
  deadline = time.time() + 120
  while not list(out.glob("train-*.tfrecord")) and time.time() < deadline:
    time.sleep(0.05)  # Until a shard is complete: the next one is being written.
  process.send_signal(signal.Signals(signum))
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == code, stderr[-2000:]
  name = signal.Signals(signum).name
  assert stderr.strip().splitlines() == [
    f"error: stopped by {name}; no file was left half-written (rerun the same command to start "
    "again)"
  ]
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_make_demo_writes_its_data_again_unless_the_last_shard_was_written():
  # It tested the first shard: a writer stopped after it left `make demo` failing for good.
  makefile = (Path(__file__).parents[1] / "Makefile").read_text()
  guard = next(line for line in makefile.splitlines() if "test -e $(DEMO_DIR)/data/" in line)
  flags = next(line for line in makefile.splitlines() if "-m mfb_jax.synthetic" in line)
  assert "--num_train=2000 --num_eval=500" in flags  # The writer's defaults otherwise: 8 and 2.
  last = synthetic.shard_paths("$(DEMO_DIR)/data", "eval", 500, 2)[-1]  # Eval is written last.
  assert f"test -e {last} ||" in guard
