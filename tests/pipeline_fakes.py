"""Shared by the input pipeline's error tests: small configs and records, and the one-line
DataError of reading everything."""

import numpy as np
import pytest
import tensorflow as tf

from configs import default
from mfb_jax import input_pipeline
from mfb_jax.bench_input import frame_record
from mfb_jax.errors import DataError

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
