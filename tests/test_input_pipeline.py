"""Input pipeline: real YouTube-8M samples, padding, sampling, sharding, eval coverage, errors."""

import glob
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from mfb_jax import input_files, input_pipeline, tfrecord_files
from mfb_jax.bench_input import frame_record, video_record
from mfb_jax.errors import DataError

SAMPLE = Path("/work/shared/yt8m_sample")
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="YouTube-8M sample not present")
D, A = 6, 3  # Small feature sizes for hand-written records.


def small_config(fmt="frame", **data):
  config = default.get_config()
  small = dict(
    format=fmt, num_classes=10, max_frames=8, rgb_size=D, audio_size=A, shuffle_buffer=16
  )
  config.data.update({**small, **data})
  return config


def video(num_frames: int, seed: int = 0):
  """(rgb uint8 [N, D], audio uint8 [N, A]) with distinct, reproducible values."""
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (num_frames, D), dtype=np.uint8),
    rng.integers(0, 256, (num_frames, A), dtype=np.uint8),
  )


def write(path, serialized: list[bytes]) -> str:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in serialized:
      writer.write(record)
  return str(path)


def write_videos(directory, counts: list[int], frames: int = 5) -> dict[str, list[int]]:
  """Shards part-I with counts[I] videos 'fI-J' of labels [J % 10, 9]; returns id -> labels."""
  expected = {}
  for f, count in enumerate(counts):
    shard = []
    for j in range(count):
      vid, labels = f"f{f}-{j}", sorted({j % 10, 9})
      shard.append(frame_record(vid, *video(frames, seed=100 * f + j), labels))
      expected[vid] = labels
    write(Path(directory) / f"part-{f}.tfrecord", shard)
  return expected


def dequantize(q):
  """Independent of the pipeline: float64 arithmetic, then rounded to float32."""
  return (q.astype(np.float64) * 4.0 / 255.0 - 2.0).astype(np.float32)


def read_all(config, pattern, batch_size=4, **kw) -> list[dict]:
  return list(input_pipeline.make_eval_iterator(config, pattern, batch_size, **kw))


class _NumpyOnly(pickle.Unpickler):
  ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
  }

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
    return super().find_class(module, name)


@needs_sample
def test_real_frame_level_record_matches_the_pickle():
  with open(SAMPLE / "example.pkl", "rb") as f:
    expected = _NumpyOnly(f, encoding="latin1").load()
  config = default.get_config()  # Official sizes: 1024 rgb, 128 audio, 3862 classes, 300 frames.
  (batch,) = read_all(config, str(SAMPLE / "derived_example_frame_level.tfrecord"), 2)
  n = int(expected[b"nframes"])
  assert n == 170 and batch["rgb"].shape == (2, 300, 1024) and batch["audio"].shape == (2, 300, 128)
  np.testing.assert_allclose(batch["rgb"][0, :n], dequantize(expected[b"feature"]), atol=1e-6)
  np.testing.assert_allclose(batch["audio"][0, :n], dequantize(expected[b"audio"]), atol=1e-6)
  assert not batch["rgb"][0, n:].any() and not batch["audio"][0, n:].any()
  np.testing.assert_array_equal(batch["mask"][0], np.arange(300) < n)
  assert np.flatnonzero(batch["labels"][0]).tolist() == expected[b"label"] == [11]
  assert batch["id"].tolist() == ["SjJ3", ""] and batch["valid"].tolist() == [1.0, 0.0]
  assert not batch["mask"][1].any() and not batch["labels"][1].any()


def _proto_features(pattern: str) -> list[dict]:
  """Every record's features via the protobuf classes (independent of tf.data parsing)."""
  out = []
  for path in sorted(glob.glob(pattern)):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      out.append(tf.train.Example.FromString(record).features.feature)
  return out


@needs_sample
@pytest.mark.parametrize("id_feature", ["video_id", "auto"])
def test_2017_video_level_validate_shards(id_feature):
  pattern = str(SAMPLE / "validatea*.tfrecord")
  config = default.get_config()
  config.data.update(format="video", num_classes=4716, id_feature=id_feature)
  batches = read_all(config, pattern, batch_size=512)
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  labels = np.concatenate([b["labels"] for b in batches])[valid]
  ids = np.concatenate([b["id"] for b in batches])[valid]
  protos = _proto_features(pattern)
  assert valid.sum() == len(protos) == 2382
  # SOURCE.md says "mean 3.43"; counting the records themselves gives 8096 / 2382 = 3.399.
  per_video = [len(set(p["labels"].int64_list.value)) for p in protos]
  assert labels.sum() == sum(per_video) == 8096
  assert ids.tolist() == [p["video_id"].bytes_list.value[0].decode() for p in protos]
  for i in (0, 1234, 2381):
    assert np.flatnonzero(labels[i]).tolist() == sorted(protos[i]["labels"].int64_list.value)
  first = batches[0]
  assert first["rgb"].shape == (512, 1, 1024) and first["mask"].shape == (512, 1)
  np.testing.assert_array_equal(first["rgb"][7, 0], protos[7]["mean_rgb"].float_list.value)
  np.testing.assert_array_equal(first["audio"][7, 0], protos[7]["mean_audio"].float_list.value)
  np.testing.assert_array_equal(np.concatenate([b["mask"][:, 0] for b in batches]), valid)


@needs_sample
def test_unlabelled_2017_test_shards_read_with_zero_labels():
  config = default.get_config()
  config.data.update(format="video", num_classes=4716)
  batches = read_all(config, str(SAMPLE / "testa*.tfrecord"), batch_size=1024)
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  ids = np.concatenate([b["id"] for b in batches])[valid]
  assert valid.sum() == 1709 and not any(b["labels"].any() for b in batches)
  assert all(len(i) == 9 and i.isdigit() for i in ids)
  first = list(input_pipeline.read_ids_and_labels(str(SAMPLE / "testa0.tfrecord"), config))
  assert len(first) == 163 and first[0][0] == ids[0] and all(not lab for _, lab in first)


def test_more_padding_leaves_real_frames_unchanged(tmp_path):
  rgb, audio = video(5)
  path = write(tmp_path / "v.tfrecord", [frame_record("v", rgb, audio, [3])])
  short, long = [read_all(small_config(max_frames=t), path, 1)[0] for t in (8, 20)]
  np.testing.assert_array_equal(short["rgb"][0, :5], long["rgb"][0, :5])
  np.testing.assert_allclose(long["rgb"][0, :5], dequantize(rgb), atol=1e-6)
  np.testing.assert_allclose(long["audio"][0, :5], dequantize(audio), atol=1e-6)
  assert not long["rgb"][0, 5:].any() and long["mask"].sum() == short["mask"].sum() == 5
  (cut,) = read_all(small_config(max_frames=3), path, 1)
  np.testing.assert_allclose(cut["rgb"][0], dequantize(rgb[:3]), atol=1e-6)
  assert cut["mask"].tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("fmt", ["frame", "video"])
def test_a_bfloat16_model_gets_bfloat16_features(tmp_path, fmt):
  """model.dtype=bfloat16: the features arrive as the bfloat16 rounding of the float32 ones (the
  dequantization itself in float32), padding still 0; masks and labels stay float32."""
  rgb, audio = video(5)
  if fmt == "frame":
    record = frame_record("v", rgb, audio, [3])
  else:
    record = video_record("v", dequantize(rgb[0]), dequantize(audio[0]), [3])
  path = write(tmp_path / "v.tfrecord", [record])
  (wide,) = read_all(small_config(fmt), path, 2)
  config = small_config(fmt)
  config.model.dtype = "bfloat16"
  (narrow,) = read_all(config, path, 2)
  for key in ("rgb", "audio"):
    assert wide[key].dtype == np.float32 and narrow[key].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(narrow[key], wide[key].astype(jax.numpy.bfloat16))
  for key in ("mask", "labels", "valid"):
    assert narrow[key].dtype == np.float32
    np.testing.assert_array_equal(narrow[key], wide[key])
  empty = input_pipeline.empty_batch(config, 2, num_frames=narrow["rgb"].shape[1])
  assert empty["rgb"].dtype == empty["audio"].dtype == jax.numpy.bfloat16


def test_random_frames_are_an_ordered_subset_and_follow_the_seed(tmp_path):
  # Frame i of video k holds the value i in every byte, so the kept frames can be read back.
  frames = lambda n, size: np.repeat(np.arange(n, dtype=np.uint8)[:, None], size, axis=1)
  records = [frame_record(f"v{k}", frames(n, D), frames(n, A), [k]) for k, n in enumerate([20, 3])]
  path = write(tmp_path / "v.tfrecord", records)
  config = small_config(max_frames=6, random_frames=True, shuffle_buffer=0)

  def kept(seed):
    batch = next(input_pipeline.make_train_iterator(config, path, seed, local_batch_size=2))
    q = np.rint((batch["rgb"][:, :, 0] + 2.0) * 255.0 / 4.0).astype(int)
    qa = np.rint((batch["audio"][:, :, 0] + 2.0) * 255.0 / 4.0).astype(int)
    return batch, q, qa

  batch, q, qa = kept(seed=1)
  long_row = batch["id"].tolist().index("v0")
  picked = q[long_row]
  assert len(set(picked)) == 6 and (np.diff(picked) > 0).all() and picked.max() < 20
  np.testing.assert_array_equal(qa[long_row], picked)  # rgb and audio keep the same frames.
  assert q[1 - long_row, :3].tolist() == [0, 1, 2] and batch["mask"][1 - long_row].sum() == 3
  assert (kept(seed=1)[1] == q).all()
  assert any((kept(seed=s)[1][long_row] != picked).any() for s in (2, 3, 4))


def test_eval_covers_every_record_once_with_padding(tmp_path):
  expected = write_videos(tmp_path, [5, 7, 2])
  pattern = str(tmp_path / "part-*.tfrecord")
  batches = read_all(small_config(), pattern, batch_size=4)
  assert len(batches) == 4  # 14 videos.
  ids = [i for b in batches for i, v in zip(b["id"], b["valid"], strict=True) if v]
  assert ids == list(expected)  # Every video once, in file order.
  last = batches[-1]
  assert last["valid"].tolist() == [1, 1, 0, 0] and last["id"].tolist()[2:] == ["", ""]
  assert not last["mask"][2:].any() and not last["labels"][2:].any() and not last["rgb"][2:].any()
  for b in batches:
    for i, vid in enumerate(b["id"]):
      if vid:
        assert np.flatnonzero(b["labels"][i]).tolist() == expected[vid]
  first6 = read_all(small_config(), pattern, batch_size=4, max_examples=6)
  assert [int(b["valid"].sum()) for b in first6] == [4, 2]
  assert list(input_pipeline.read_ids_and_labels(pattern, small_config())) == list(expected.items())


def test_processes_read_disjoint_files(tmp_path):
  expected = write_videos(tmp_path, [3, 4, 2])
  pattern = str(tmp_path / "part-*.tfrecord")
  shares = []
  for index in range(2):
    batches = read_all(small_config(), pattern, 4, process_index=index, process_count=2)
    shares.append({i for b in batches for i in b["id"] if i})
  assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(expected)
  assert shares[1] == {f"f1-{j}" for j in range(4)}  # Sorted files, strided: part-1 only.
  with pytest.raises(DataError, match="process 3 of 4 gets no files: .* matches 3 file"):
    input_files.list_files(pattern, 3, 4)


def test_train_iterator_is_deterministic_and_labels_match(tmp_path):
  expected = write_videos(tmp_path, [6, 6, 6])
  pattern = str(tmp_path / "part-*.tfrecord")

  def ids(seed, steps=5):
    batches = input_pipeline.make_train_iterator(small_config(), pattern, seed, 4)
    out = []
    for _ in range(steps):  # 20 batches of 4 from 18 videos: wraps around (infinite).
      b = next(batches)
      for i, vid in enumerate(b["id"]):
        assert np.flatnonzero(b["labels"][i]).tolist() == expected[vid]
      assert b["valid"].all() and b["rgb"].shape == (4, 8, D)
      out.extend(b["id"])
    return out

  first = ids(seed=7)
  assert ids(seed=7) == first and ids(seed=8) != first


def test_train_files_are_checked_once_for_all_streams(tmp_path, monkeypatch):
  write_videos(tmp_path, [3, 3, 3])
  pattern = str(tmp_path / "part-*.tfrecord")
  calls = []

  def counted(module, name):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda path: calls.append(name) or real(path))

  counted(tf.io.gfile, "stat")
  counted(tfrecord_files, "compression_type")
  train_files = input_pipeline.TrainFiles(pattern)
  assert calls.count("stat") == 3 and calls.count("compression_type") >= 3
  listing = list(calls)
  streams = [train_files.batches(small_config(), seed, 3) for seed in (1, 2, 3)]
  assert [len(next(b)["id"]) for b in streams] == [3, 3, 3]
  assert calls == listing  # The streams list, stat and read the headers of no file again.


def test_to_global_and_empty_batch():
  config = small_config()
  batch = input_pipeline.empty_batch(config, 4, num_frames=8)
  shapes = {k: v.shape for k, v in batch.items()}
  assert shapes == {
    "rgb": (4, 8, D),
    "audio": (4, 8, A),
    "mask": (4, 8),
    "labels": (4, 10),
    "valid": (4,),
    "id": (4,),
  }
  assert batch["id"].tolist() == [""] * 4 and batch["rgb"].dtype == np.float32
  batch["rgb"] = np.arange(4 * 8 * D, dtype=np.float32).reshape(4, 8, D)
  mesh = jax.make_mesh((1,), ("data",))
  arrays = input_pipeline.to_global(batch, mesh)
  assert set(arrays) == set(batch) - {"id"}
  np.testing.assert_array_equal(np.asarray(arrays["rgb"]), batch["rgb"])
  assert arrays["labels"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_the_pipelines_batches_reach_one_cpu_device_without_a_copy(tmp_path):
  # tf.data's buffers are 64-byte aligned, so JAX's CPU client uses them as they are: a copy of
  # a paper-sized frame tensor (157 MB) costs the training loop 32-42 ms per step (BENCHMARKS.md).
  write_videos(tmp_path, [4])
  batches = input_pipeline.make_train_iterator(small_config(), str(tmp_path / "part-*"), 0, 4)
  batch = next(batches)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices("cpu")[:1])
  arrays = input_pipeline.to_global(batch, mesh)
  for key in ("rgb", "audio", "mask", "labels", "valid"):
    assert arrays[key].unsafe_buffer_pointer() == batch[key].ctypes.data, key
