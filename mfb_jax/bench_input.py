r"""Reader benchmark: frame-level tfrecords to numpy batches, examples per second.

  python -m mfb_jax.bench_input [--pattern=GLOB] [--batch_size=128] [--seconds=5] [--rounds=3] \
    [--dtype=float32|bfloat16]

Without --pattern it writes temporary shards of 300-frame videos with random uint8 features in
the official 2018 format. It alternates timed windows of mfb_jax.input_pipeline's train iterator
and of a plain per-record reader (map(parse_single_sequence_example) then batch) in one process,
so both see the same machine load, and prints one JSON line per reader, ours last with the ratio.
--dtype is config.model.dtype: our reader delivers the features in it (the plain reader float32).
Like launch.py it runs with tcmalloc when installed (MFB_JAX_NO_TCMALLOC=1 to opt out).
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from mfb_jax import cli, runtime

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importers keep their flag names)."""
  flags.DEFINE_string("pattern", "", "Frame-level tfrecord glob(s); empty: write random shards.")
  flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
  flags.DEFINE_float("seconds", 5.0, "Length of each timed window.")
  flags.DEFINE_integer("rounds", 3, "Timed windows per reader, alternating between the readers.")
  flags.DEFINE_integer("num_frames", 300, "Frames per generated video (and data.max_frames).")
  flags.DEFINE_integer("num_files", 4, "Generated shards.")
  flags.DEFINE_integer("records_per_file", 64, "Videos per generated shard.")
  flags.DEFINE_integer(
    "shuffle_buffer", -1, "data.shuffle_buffer for our reader; -1: the config's."
  )
  flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "config.model.dtype: our reader's feature dtype."
  )


def _bytes_feature(value: bytes):
  import tensorflow as tf

  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def frame_record(video_id: str, rgb_TxD, audio_TxA, labels, id_key: str = "id") -> bytes:
  """A serialized 2018 frame-level SequenceExample (features uint8, one bytes value per frame)."""
  import tensorflow as tf

  context = {
    id_key: _bytes_feature(video_id.encode()),
    "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in labels])),
  }
  lists = {
    name: tf.train.FeatureList(feature=[_bytes_feature(np.asarray(f).tobytes()) for f in frames])
    for name, frames in (("rgb", rgb_TxD), ("audio", audio_TxA))
  }
  return tf.train.SequenceExample(
    context=tf.train.Features(feature=context),
    feature_lists=tf.train.FeatureLists(feature_list=lists),
  ).SerializeToString()


def video_record(video_id: str, mean_rgb, mean_audio, labels, id_key: str = "id") -> bytes:
  """A serialized video-level Example (float mean_rgb / mean_audio)."""
  import tensorflow as tf

  floats = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=list(map(float, v))))
  feature = {
    id_key: _bytes_feature(video_id.encode()),
    "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in labels])),
    "mean_rgb": floats(mean_rgb),
    "mean_audio": floats(mean_audio),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_random_shards(directory: str, num_files: int, per_file: int, num_frames: int) -> str:
  """Shards of random 2018-format videos (1024 rgb, 128 audio, 3862 classes); returns a glob."""
  import tensorflow as tf

  rng = np.random.default_rng(0)
  for f in range(num_files):
    with tf.io.TFRecordWriter(os.path.join(directory, f"bench-{f:03d}.tfrecord")) as writer:
      for i in range(per_file):
        rgb = rng.integers(0, 256, (num_frames, 1024), dtype=np.uint8)
        audio = rng.integers(0, 256, (num_frames, 128), dtype=np.uint8)
        labels = rng.choice(3862, size=rng.integers(1, 6), replace=False)
        writer.write(frame_record(f"b{f}v{i}", rgb, audio, labels))
  return os.path.join(directory, "bench-*.tfrecord")


def plain_reader(files: list[str], config, batch_size: int):
  """The baseline: one parse op per record, dequantized per record, then batched."""
  import tensorflow as tf

  data, T = config.data, config.data.max_frames
  context = {"labels": tf.io.VarLenFeature(tf.int64)}
  sequence = {k: tf.io.FixedLenSequenceFeature([], tf.string) for k in ("rgb", "audio")}

  def parse(serialized):
    ctx, seq = tf.io.parse_single_sequence_example(serialized, context, sequence)
    out = {}
    for key, size in (("rgb", data.rgb_size), ("audio", data.audio_size)):
      q = tf.reshape(tf.io.decode_raw(seq[key], tf.uint8), [-1, size])[:T]
      x = tf.cast(q, tf.float32) * (4.0 / 255.0) - 2.0
      out[key] = tf.pad(x, [[0, T - tf.shape(x)[0]], [0, 0]])
    n = tf.minimum(tf.shape(seq["rgb"])[0], T)
    out["mask"] = tf.sequence_mask(n, T, tf.float32)
    hot = tf.one_hot(ctx["labels"].values, data.num_classes)
    out["labels"] = tf.minimum(tf.reduce_sum(hot, axis=0), 1.0)
    return out

  from mfb_jax import input_files

  types = input_files.compressions(files)  # GZIP and ZLIB files, as our reader reads them.
  read = lambda path, compression: tf.data.TFRecordDataset(path, compression_type=compression)
  ds = tf.data.Dataset.from_tensor_slices((files, types)).flat_map(read)
  ds = ds.repeat().map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  return _checked(ds.batch(batch_size, drop_remainder=True).prefetch(2).as_numpy_iterator())


def _checked(batches):
  """The plain reader's batches; a TensorFlow error as one line (our reader's checks come first,
  so this is rare: data that only the plain reader's simpler parsing refuses)."""
  import tensorflow as tf

  from mfb_jax.errors import DataError

  try:
    yield from batches
  except tf.errors.OpError as e:
    first = (e.message.strip().splitlines() or [type(e).__name__])[0]
    raise DataError(f"the plain per-record reader failed: {first}") from e


def _busy_ticks() -> int:
  """Non-idle CPU ticks of the whole machine (all processes)."""
  with open("/proc/stat") as f:
    values = [int(v) for v in f.readline().split()[1:]]
  return sum(values) - values[3] - values[4]


def timed_window(batches, seconds: float) -> dict:
  """Examples/sec over `seconds`, with this process's and everything else's CPU use (cores)."""
  next(batches)  # Let the other reader's prefetch threads go quiet first.
  count, start, cpu, busy = 0, time.perf_counter(), os.times(), _busy_ticks()
  while time.perf_counter() - start < seconds:
    count += len(next(batches)["rgb"])
  wall = time.perf_counter() - start
  end_cpu = os.times()
  own = (end_cpu.user - cpu.user + end_cpu.system - cpu.system) / wall
  other = (_busy_ticks() - busy) / os.sysconf("SC_CLK_TCK") / wall - own
  return {"examples_per_sec": count / wall, "own_cores": own, "other_cores": max(other, 0.0)}


def summarize(windows: list[dict]) -> dict:
  median = lambda k: float(np.median([w[k] for w in windows]))
  per_cpu = [w["examples_per_sec"] / max(w["own_cores"], 1e-9) for w in windows]
  return {
    "examples_per_sec": round(median("examples_per_sec"), 1),
    "examples_per_cpu_sec": round(float(np.median(per_cpu)), 1),
    "windows": [round(w["examples_per_sec"]) for w in windows],
    "own_cores": round(median("own_cores"), 2),
    "other_load_cores": round(median("other_cores"), 2),
  }


def machine() -> dict:
  model = "unknown"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return {"cpu": model, "cores": os.cpu_count(), "tcmalloc": runtime.tcmalloc_loaded()}


def run(pattern: str) -> None:
  from configs import default
  from mfb_jax import input_files, input_pipeline

  config = default.get_config()
  config.data.max_frames = FLAGS.num_frames
  config.model.dtype = FLAGS.dtype
  if FLAGS.shuffle_buffer >= 0:
    config.data.shuffle_buffer = FLAGS.shuffle_buffer
  files = input_files.list_files(pattern)
  readers = {
    "plain_per_record": plain_reader(files, config, FLAGS.batch_size),
    "mfb_jax.input_pipeline": input_pipeline.make_train_iterator(
      config, pattern, seed=0, local_batch_size=FLAGS.batch_size
    ),
  }
  windows = {name: [] for name in readers}
  # Warm-up: graph building, shuffle buffer fill. Ours first: its checks name bad data.
  for batches in reversed(readers.values()):
    timed_window(batches, 1.0)
  for _ in range(FLAGS.rounds):
    for name, batches in readers.items():
      windows[name].append(timed_window(batches, FLAGS.seconds))
  common = {"batch_size": FLAGS.batch_size, "max_frames": FLAGS.num_frames, **machine()}
  common["dtype"] = FLAGS.dtype
  plain = {"reader": "plain_per_record", **summarize(windows["plain_per_record"]), **common}
  ours = {"reader": "mfb_jax.input_pipeline", **summarize(windows["mfb_jax.input_pipeline"])}
  ours["ratio_to_plain"] = round(ours["examples_per_sec"] / plain["examples_per_sec"], 3)
  ours["cpu_ratio_to_plain"] = round(
    ours["examples_per_cpu_sec"] / plain["examples_per_cpu_sec"], 3
  )
  print(json.dumps(plain), flush=True)
  print(json.dumps({**ours, **common}), flush=True)


def _check_flags() -> None:
  for name in ("batch_size", "rounds", "num_frames", "num_files", "records_per_file"):
    if FLAGS[name].value < 1:
      cli.fail(f"--{name}={FLAGS[name].value}: must be >= 1")
  if not FLAGS.seconds > 0:
    cli.fail(f"--seconds={FLAGS.seconds}: must be > 0")
  if FLAGS.shuffle_buffer == 0 or FLAGS.shuffle_buffer < -1:
    cli.fail(f"--shuffle_buffer={FLAGS.shuffle_buffer}: must be >= 1, or -1 for the config's")


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  _check_flags()
  runtime.preload_tcmalloc(module=__spec__.name)
  runtime.quiet_library_logs()
  from mfb_jax.errors import UserError

  try:
    if FLAGS.pattern:
      run(FLAGS.pattern)
      return
    with tempfile.TemporaryDirectory(prefix="mfb_bench_input_") as directory:
      pattern = write_random_shards(
        directory, FLAGS.num_files, FLAGS.records_per_file, FLAGS.num_frames
      )
      run(pattern)
  except UserError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
