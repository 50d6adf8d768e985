"""Compressed tfrecord shards: told from their first bytes and read like uncompressed ones."""

import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from mfb_jax import input_pipeline, tfds_yt8m, tfrecord_files
from mfb_jax.bench_input import frame_record
from mfb_jax.errors import DataError

D, A = 6, 3


def small_config():
  config = default.get_config()
  config.data.update(format="frame", num_classes=10, max_frames=4, rgb_size=D, audio_size=A)
  return config


def write(path, records: list[bytes], compression: str = "") -> str:
  with tf.io.TFRecordWriter(str(path), options=compression or None) as writer:
    for record in records:
      writer.write(record)
  return str(path)


def videos(first: int, count: int) -> list[bytes]:
  rng = np.random.default_rng(first)
  out = []
  for j in range(first, first + count):
    rgb = rng.integers(0, 256, (3 + j % 3, D), dtype=np.uint8)
    out.append(frame_record(f"v{j}", rgb, rng.integers(0, 256, (len(rgb), A), np.uint8), [j % 10]))
  return out


def test_crc32c_matches_known_values():
  # The CRC-32C check values of RFC 3720, section B.4.
  assert tfrecord_files.crc32c(b"123456789") == 0xE3069283
  assert tfrecord_files.crc32c(bytes(32)) == 0x8A9136AA


@pytest.mark.parametrize("size", [0, 5, 351_000])
def test_masked_crc_matches_the_header_tensorflow_writes(tmp_path, size):
  path = write(tmp_path / "one.tfrecord", [b"x" * size])
  head = open(path, "rb").read(12)
  assert head[:8] == struct.pack("<Q", size)  # The record's length, then its masked CRC.
  assert struct.pack("<I", tfrecord_files.masked_crc32c(head[:8])) == head[8:12]


@pytest.mark.parametrize("compression", ["", "GZIP", "ZLIB"])
def test_compression_is_told_from_the_file(tmp_path, compression):
  path = write(tmp_path / "part.tfrecord", videos(0, 2), compression)
  assert tfrecord_files.compression_type(path) == compression


@pytest.mark.parametrize("length, magic", [(0x8B1F, b"\x1f\x8b"), (0x0178, b"\x78\x01")])
def test_a_length_that_looks_compressed_is_still_uncompressed(tmp_path, length, magic):
  # The length field starts like a GZIP or ZLIB stream; the header's CRC says otherwise, and
  # with a damaged CRC the stream does not decode: the file is reported as corrupt, not as
  # a corrupt compressed file.
  path = write(tmp_path / "part.tfrecord", [b"\0" * length])
  assert open(path, "rb").read(2) == magic
  assert tfrecord_files.compression_type(path) == ""
  data = bytearray(open(path, "rb").read())
  data[8] ^= 1
  assert tfrecord_files.compression_of_header(bytes(data[:256])) == ""
  assert tfrecord_files.compression_of_header(b"\x1f\x8b\x08\0") == "GZIP"
  assert tfrecord_files.compression_of_header(b"\x78\x9c") == "ZLIB"
  assert tfrecord_files.compression_of_header(b"\x78\x9d") == ""  # Not a multiple of 31.
  assert tfrecord_files.compression_of_header(b"garbage bytes here") == ""


def test_mixed_shards_give_the_batches_of_uncompressed_ones(tmp_path):
  plain, mixed = tmp_path / "plain", tmp_path / "mixed"
  plain.mkdir(), mixed.mkdir()
  for i, compression in enumerate(["", "GZIP", "ZLIB"]):
    write(plain / f"part-{i}.tfrecord", videos(10 * i, 5))
    write(mixed / f"part-{i}.tfrecord", videos(10 * i, 5), compression)
  config = small_config()
  for reader in (
    lambda d: input_pipeline.make_eval_iterator(config, f"{d}/part-*", 4),
    lambda d: input_pipeline.make_train_iterator(config, f"{d}/part-*", seed=3, local_batch_size=4),
  ):
    want, got = reader(plain), reader(mixed)
    for _ in range(4):  # The eval split is 4 batches; train goes on (and into a second epoch).
      a, b = next(want), next(got)
      assert a["id"].tolist() == b["id"].tolist()
      for key in ("rgb", "audio", "mask", "labels", "valid"):
        np.testing.assert_array_equal(a[key], b[key])
  ids = [vid for vid, _ in input_pipeline.read_ids_and_labels(f"{mixed}/part-*", config)]
  assert ids == [f"v{j}" for i in range(3) for j in range(10 * i, 10 * i + 5)]


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_damaged_compressed_file_is_named(tmp_path, compression):
  write(tmp_path / "part-0.tfrecord", videos(0, 3))
  path = write(tmp_path / "part-1.tfrecord", videos(10, 3), compression)
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) * 2 // 3])
  with pytest.raises(DataError) as error:
    list(input_pipeline.make_eval_iterator(small_config(), f"{tmp_path}/part-*", 2))
  assert str(error.value).startswith(
    f"{path}: corrupt or truncated {compression}-compressed tfrecord file"
  )


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
@pytest.mark.parametrize("kept", [6, 15, -1])
def test_a_compressed_file_cut_near_its_start_is_named(tmp_path, compression, kept):
  # Cut inside the GZIP header, it read as an empty file ("no records"); an empty but complete
  # stream (kept=-1: nothing cut) is a file without records, not a damaged one.
  path = write(tmp_path / "part-0.tfrecord", [] if kept == -1 else videos(0, 3), compression)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:kept] if kept > 0 else data)
  if kept == -1:
    assert tfrecord_files.compression_type(path) == compression
    return
  with pytest.raises(DataError) as error:
    list(input_pipeline.make_eval_iterator(small_config(), f"{tmp_path}/part-*", 2))
  assert str(error.value) == (
    f"{path}: corrupt or truncated {compression}-compressed tfrecord file (its {kept} bytes end "
    "inside the compressed stream)"
  )


def _eval_ids(directory) -> list[str]:
  batches = input_pipeline.make_eval_iterator(small_config(), f"{directory}/part-*", 4)
  return [i for b in batches for i, v in zip(b["id"].tolist(), b["valid"], strict=True) if v]


def test_joined_gzip_members_are_read_and_joined_zlib_streams_refused(tmp_path):
  # TensorFlow reads every member of a GZIP file (cat a.gz b.gz), but only the first stream of
  # a ZLIB file: the second one's videos were left out of GAP and predictions.csv silently.
  for compression in ("GZIP", "ZLIB"):
    directory = tmp_path / compression
    directory.mkdir()
    first = open(write(tmp_path / "a", videos(0, 3), compression), "rb").read()
    second = open(write(tmp_path / "b", videos(10, 2), compression), "rb").read()
    (directory / "part-0.tfrecord").write_bytes(first + second)
    if compression == "GZIP":
      assert _eval_ids(directory) == ["v0", "v1", "v2", "v10", "v11"]
      continue
    with pytest.raises(DataError) as error:
      _eval_ids(directory)
    assert str(error.value) == (
      f"{directory}/part-0.tfrecord: {len(second)} bytes follow the end of its ZLIB stream, and "
      "TensorFlow's reader ignores them (ZLIB files joined with cat?): write the records as one "
      "stream"
    )


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_a_compressed_file_without_its_last_bytes_is_named(tmp_path, compression):
  # The records are whole, only the stream's end (a GZIP trailer's CRC and size, a ZLIB
  # Adler-32) is cut: it was read without a word.
  path = write(tmp_path / "part-0.tfrecord", videos(0, 3), compression)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-3])
  with pytest.raises(DataError) as error:
    _eval_ids(tmp_path)
  assert str(error.value) == (
    f"{path}: corrupt or truncated {compression}-compressed tfrecord file (it ends inside its "
    "compressed stream)"
  )


def test_tfds_builder_reads_gzip_shards(tmp_path):
  rng = np.random.default_rng(1)
  rgb, audio = rng.integers(0, 256, (2, 1024), np.uint8), rng.integers(0, 256, (2, 128), np.uint8)
  manual = tmp_path / "frame"
  manual.mkdir()
  write(manual / "validate0.tfrecord.gz", [frame_record("g", rgb, audio, [7])], "GZIP")
  config = tfds.download.DownloadConfig(manual_dir=str(manual))
  kwargs = dict(
    data_dir=str(tmp_path / "tfds"), download_and_prepare_kwargs={"download_config": config}
  )
  (example,) = tfds.as_numpy(
    tfds.load(f"{tfds_yt8m.Yt8mRecords.name}/frame", split="validation", **kwargs)
  )
  assert example["id"] == b"g" and example["labels"].tolist() == [7]
  np.testing.assert_array_equal(example["rgb"], rgb)
