r"""TFDS builder for YouTube-8M tfrecords you already have on disk (manual download).

  import tensorflow_datasets as tfds
  from mfb_jax import tfds_yt8m  # Registers 'yt8m_records'.
  ds = tfds.load('yt8m_records/frame', split='validation', data_dir='/data/tfds',
                 download_and_prepare_kwargs={'download_config': tfds.download.DownloadConfig(
                     manual_dir='/data/yt8m/frame')})

The manual dir holds the official shards: train*.tfrecord, validate*.tfrecord, test*.tfrecord
(each split is made from the files present; GZIP or ZLIB compressed ones, which may also be named
*.tfrecord.gz, are read too). Configs: 'frame' (2018 frame-level SequenceExamples, 3862
classes), 'video' (2018 video-level Examples) and 'video_2017' (v1 video-level Examples, 4716
classes). Frame features stay uint8 (dequantize with q * 4/255 - 2);
video-level features are the records' floats. Ids are read from 'id' or, failing that, 'video_id'.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from mfb_jax import records, tf_errors, tfrecord_files
from mfb_jax.errors import DataError

RGB_SIZE, AUDIO_SIZE = 1024, 128
SPLIT_PREFIXES = {"train": "train", "validation": "validate", "test": "test"}
SUFFIXES = (".tfrecord", ".tfrecord.gz")  # Compressed shards are read too (tfrecord_files).


@dataclasses.dataclass
class Yt8mConfig(tfds.core.BuilderConfig):
  """Record format and label space of one YouTube-8M release."""

  format: str = "frame"  # 'frame' (SequenceExample) or 'video' (Example).
  num_classes: int = 3862


class Yt8mRecords(tfds.core.GeneratorBasedBuilder):
  """YouTube-8M frame- or video-level records from a local manual dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the YouTube-8M tfrecords (research.google.com/youtube8m/download.html) and put "
    "train*.tfrecord, validate*.tfrecord and/or test*.tfrecord of one format in manual_dir."
  )
  BUILDER_CONFIGS = [
    Yt8mConfig(name="frame", description="2018 frame-level: uint8 rgb [N,1024], audio [N,128]."),
    Yt8mConfig(name="video", format="video", description="2018 video-level mean features."),
    Yt8mConfig(
      name="video_2017", format="video", num_classes=4716, description="2017 (v1) video-level."
    ),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 looks this up through the `importlib_resources` backport, which is not
    # installed (nor needed on Python 3.11); the answer is simply this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config.format == "frame":
      media = {
        "rgb": tfds.features.Tensor(shape=(None, RGB_SIZE), dtype=np.uint8),
        "audio": tfds.features.Tensor(shape=(None, AUDIO_SIZE), dtype=np.uint8),
      }
    else:
      media = {
        "mean_rgb": tfds.features.Tensor(shape=(RGB_SIZE,), dtype=np.float32),
        "mean_audio": tfds.features.Tensor(shape=(AUDIO_SIZE,), dtype=np.float32),
      }
    labels = tfds.features.Sequence(tfds.features.ClassLabel(num_classes=config.num_classes))
    features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "labels": labels, **media})
    return self.dataset_info_from_configs(
      features=features, homepage="https://research.google.com/youtube8m/"
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = dl_manager.manual_dir
    splits = {}
    for split, prefix in SPLIT_PREFIXES.items():
      files = sorted(p for suffix in SUFFIXES for p in manual_dir.glob(f"{prefix}*{suffix}"))
      if files:
        splits[split] = self._generate_examples(files)
    if not splits:
      raise DataError(f"no train*/validate*/test*.tfrecord(.gz) files in manual dir {manual_dir}")
    return splits

  def _generate_examples(self, files):
    parse = _frame_example if self.builder_config.format == "frame" else _video_example
    num_classes = self.builder_config.num_classes
    for path in files:
      compression = tfrecord_files.compression_type(str(path))
      records_ds = tf.data.TFRecordDataset(str(path), compression_type=compression)
      for index, record in enumerate(_named_errors(records_ds, str(path), compression)):
        where = f"{path}: record {index}"
        example = parse(record, where)
        bad = [x for x in example["labels"] if not 0 <= x < num_classes]
        if bad:
          raise DataError(f"{where}: label {bad[0]} is outside [0, {num_classes})")
        yield f"{path.name}:{index}", example


def _named_errors(records_ds: tf.data.Dataset, path: str, compression: str):
  """The records; TensorFlow's read errors (a truncated file) as one line naming the file."""
  try:
    yield from records_ds.as_numpy_iterator()
  except tf.errors.DataLossError as e:
    raise tf_errors.corrupt(path, compression, e) from e
  except tf.errors.OpError as e:
    raise tf_errors.unreadable(path, e) from e


def _id_and_labels(features) -> dict:
  key = "id" if "id" in features else "video_id"
  video_id = records.id_text(features[key].bytes_list.value[0]) if key in features else ""
  return {"id": video_id, "labels": list(features["labels"].int64_list.value)}


def _frame_example(record: bytes, where: str) -> dict:
  proto = tf.train.SequenceExample.FromString(record)
  example = _id_and_labels(proto.context.feature)
  lists = proto.feature_lists.feature_list
  for key, size in (("rgb", RGB_SIZE), ("audio", AUDIO_SIZE)):
    frames = [b"".join(f.bytes_list.value) for f in lists[key].feature] if key in lists else []
    wrong = [len(f) for f in frames if len(f) != size]
    if not frames or wrong:
      found = f"frames of {wrong[0]} bytes" if wrong else "no frames"
      raise DataError(f"{where}: feature '{key}' has {found}, expected {size} bytes per frame")
    example[key] = np.frombuffer(b"".join(frames), np.uint8).reshape(-1, size)
  if len(example["rgb"]) != len(example["audio"]):
    rgb, audio = len(example["rgb"]), len(example["audio"])
    raise DataError(f"{where}: 'rgb' has {rgb} frames but 'audio' has {audio}")
  return example


def _video_example(record: bytes, where: str) -> dict:
  features = tf.train.Example.FromString(record).features.feature
  example = _id_and_labels(features)
  for key, size in (("mean_rgb", RGB_SIZE), ("mean_audio", AUDIO_SIZE)):
    values = features[key].float_list.value if key in features else []
    if len(values) != size:
      hint = " (frame-level data? use yt8m_records/frame)" if not values else ""
      raise DataError(f"{where}: feature '{key}' has {len(values)} values, expected {size}{hint}")
    example[key] = np.asarray(values, np.float32)
  return example
