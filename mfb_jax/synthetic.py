r"""Writes synthetic shards in the official YouTube-8M format, with planted learnable structure.

  python -m mfb_jax.synthetic --output_dir=/tmp/yt8m_synth            # ~1000 train + 250 eval
  python -m mfb_jax.synthetic --output_dir=D --format=video --num_train=5000 --seed=1

Files: D/train-00000-of-00008.tfrecord ... and D/eval-00000-of-00002.tfrecord ..., nothing else
(a glob D/* must see records only). --world_json=PATH also writes which label ids are visual,
audio, conjunction or event classes, for per-kind analysis of results.
Frame-level records are tf.train.SequenceExample: context `id` (bytes), `labels` (int64) and
feature_lists `rgb` / `audio` (per frame one bytes feature of 1024 / 128 uint8), as in the 2018
data. Video-level records (--format=video) are tf.train.Example: `id`, `labels`, `mean_rgb`
(1024 floats) and `mean_audio` (128 floats), the means of the dequantized frames (q * 4/255 - 2)
of the same videos. Same flags and seed give the same bytes; a video's content depends only on
(seed, split, index), not on the shard count.

The generative model (mfb_jax/synthetic_world.py has the details and the numbers): label ids come
in kinds decided by different evidence, so that the paper's comparisons mean something:
  visual classes   - a prototype direction in the rgb frames (any rgb aggregation sees it);
  audio classes    - the same in the audio frames (invisible to video-only models);
  conjunction      - a visual and an audio factor with random signs, the label fires when the
                     signs agree: each stream alone is at chance, the bilinear product decides;
  events           - 3-8 frames of a strong prototype (rgb or audio): max-pooling or clustering
                     keeps them, the mean over 60-300 frames dilutes them under the noise.
Most label ids never occur (like the rare classes of the real 3862), about 3 labels per video.
"""

import contextlib
import json
import os
import re
import time

import numpy as np
from absl import app, flags

from mfb_jax import cli, errors, signals
from mfb_jax.synthetic_world import (  # noqa: F401 - re-exported for probes and tests.
  AUDIO_SIZE,
  KINDS,
  RGB_SIZE,
  Params,
  Video,
  World,
  generate_video,
  make_world,
  video_rng,
)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importers keep their flag names)."""
  flags.DEFINE_string("output_dir", None, "Directory for the shards (created if missing).")
  flags.DEFINE_integer("num_train", 1000, "Videos in the train split (0: no train split).")
  flags.DEFINE_integer("num_eval", 250, "Videos in the eval split (0: no eval split).")
  flags.DEFINE_integer("num_shards", 8, "Train shards (at most one per video).")
  flags.DEFINE_integer("num_eval_shards", 2, "Eval shards (at most one per video).")
  flags.DEFINE_integer("num_classes", 3862, "Label vocabulary size (3862 = the 2018 data).")
  flags.DEFINE_float("active_fraction", 0.05, "Share of label ids that occur (at least 16).")
  flags.DEFINE_float("labels_per_video", 3.0, "Mean labels per video (every video has >= 1).")
  flags.DEFINE_integer("min_frames", 60, "Fewest frames per video.")
  flags.DEFINE_integer("max_frames", 300, "Most frames per video (uniform in between).")
  flags.DEFINE_enum("format", "frame", ["frame", "video"], "frame: SequenceExample; video: means.")
  flags.DEFINE_integer("seed", 0, "Seed of the world and of every video.")
  flags.DEFINE_string("world_json", "", "Optional JSON of the class kinds (outside output_dir).")
  flags.mark_flag_as_required("output_dir")


_SHARD_RE = re.compile(r"^(train|eval)-\d{5}-of-(\d{5})\.tfrecord$")


def _tf():
  """TensorFlow, imported on first use: a bad flag fails fast, in one line, without TF's logs."""
  from mfb_jax import runtime

  return runtime.import_tensorflow()


def frame_record(video_id: str, video: Video) -> bytes:
  """A serialized frame-level tf.train.SequenceExample (2018 schema)."""
  example = _tf().train.SequenceExample()
  context = example.context.feature
  context["id"].bytes_list.value.append(video_id.encode())
  context["labels"].int64_list.value.extend(video.labels.tolist())
  for name, frames in (("rgb", video.rgb), ("audio", video.audio)):
    feature_list = example.feature_lists.feature_list[name].feature
    for frame in frames:
      feature_list.add().bytes_list.value.append(frame.tobytes())
  return example.SerializeToString(deterministic=True)


def video_means(video: Video) -> tuple[np.ndarray, np.ndarray]:
  """(mean_rgb [D], mean_audio [A]) float32: the mean of the dequantized frames."""
  return tuple(
    (q.mean(axis=0, dtype=np.float64) * (4.0 / 255.0) - 2.0).astype(np.float32)
    for q in (video.rgb, video.audio)
  )


def video_record(video_id: str, video: Video) -> bytes:
  """A serialized video-level tf.train.Example (mean features of the same frames)."""
  mean_rgb, mean_audio = video_means(video)
  example = _tf().train.Example()
  feature = example.features.feature
  feature["id"].bytes_list.value.append(video_id.encode())
  feature["labels"].int64_list.value.extend(video.labels.tolist())
  feature["mean_rgb"].float_list.value.extend(mean_rgb.tolist())
  feature["mean_audio"].float_list.value.extend(mean_audio.tolist())
  return example.SerializeToString(deterministic=True)


def video_id(split: str, index: int) -> str:
  """The id written for video `index` of `split` (unique across splits)."""
  return f"{split}{index:07d}"


def shard_paths(output_dir: str, split: str, num_videos: int, num_shards: int) -> list[str]:
  """File names of a split; never more shards than videos."""
  count = min(num_shards, num_videos)
  names = [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]
  return [os.path.join(output_dir, name) for name in names]


def write_split(
  world: World,
  output_dir: str,
  split: str,
  num_videos: int,
  num_shards: int,
  seed: int,
  frames: tuple[int, int] = (60, 300),
  fmt: str = "frame",
) -> list[str]:
  """Writes one split (videos in contiguous blocks per shard); returns the file paths."""
  serialize = frame_record if fmt == "frame" else video_record
  tf = _tf()  # Imported before the clock starts: videos/s measures writing only.
  paths = shard_paths(output_dir, split, num_videos, num_shards)
  bounds = np.linspace(0, num_videos, len(paths) + 1).round().astype(int)
  start_time, total_frames = time.perf_counter(), 0
  for path, first, end in zip(paths, bounds[:-1], bounds[1:], strict=True):
    # Written under a hidden name and renamed when complete: no glob sees a half-written shard.
    tmp_path = os.path.join(output_dir, f".{os.path.basename(path)}.tmp")
    try:
      with tf.io.TFRecordWriter(tmp_path) as writer:
        for index in range(first, end):
          video = generate_video(world, video_rng(seed, split, index), *frames)
          total_frames += len(video.rgb)
          writer.write(serialize(video_id(split, index), video))
      os.replace(tmp_path, path)
    except BaseException as e:  # A full disk, Ctrl-C: no hidden half-written shard stays.
      with contextlib.suppress(OSError):
        os.remove(tmp_path)
      if isinstance(e, OSError | tf.errors.OpError):
        from mfb_jax import workdir_files  # Deferred: imports JAX.

        raise workdir_files.write_error(path, e) from e
      raise
    elapsed = time.perf_counter() - start_time
    print(
      f"wrote {path} ({end - first} videos)  {split}: {end}/{num_videos} videos, "
      f"{end / elapsed:.0f} videos/s",
      flush=True,
    )
  elapsed = time.perf_counter() - start_time
  print(
    f"{split}: {num_videos} videos ({total_frames} frames, {fmt}-level) in {len(paths)} files, "
    f"{elapsed:.1f} s, {num_videos / max(elapsed, 1e-9):.0f} videos/s",
    flush=True,
  )
  return paths


def write_dataset(
  output_dir: str,
  num_train: int = 1000,
  num_eval: int = 250,
  num_shards: int = 8,
  num_eval_shards: int = 2,
  seed: int = 0,
  num_classes: int = 3862,
  params: Params | None = None,
  frames: tuple[int, int] = (60, 300),
  fmt: str = "frame",
  world_json: str = "",
) -> dict[str, list[str]]:
  """Writes the train and eval splits (and world_json if given); returns {split: paths}."""
  validate(num_train, num_eval, num_shards, num_eval_shards, seed, num_classes, frames, fmt)
  world = make_world(seed, num_classes, params)
  splits = {name: n for name, n in (("train", num_train), ("eval", num_eval)) if n > 0}
  shards = {"train": num_shards, "eval": num_eval_shards}
  planned = {s: shard_paths(output_dir, s, n, shards[s]) for s, n in splits.items()}
  if world_json:  # Checked first: a bad path is not worth learning of after minutes of shards.
    _check_world_json(world_json, output_dir)
  _make_output_dir(output_dir, planned)
  written = {}
  for split, n in splits.items():
    written[split] = write_split(world, output_dir, split, n, shards[split], seed, frames, fmt)
  if world_json:
    _write_world_json(world, world_json, seed, fmt, frames, splits)
  return written


def _make_output_dir(output_dir: str, planned: dict[str, list[str]]) -> None:
  """Creates output_dir; refuses shards of another run that a split's glob would also match."""
  try:
    os.makedirs(output_dir, exist_ok=True)
    existing = os.listdir(output_dir)
  except OSError as e:
    raise errors.DataError(f"--output_dir={output_dir}: cannot create or list: {e}") from e
  keep = {os.path.basename(p) for paths in planned.values() for p in paths}
  stale = sorted(f for f in existing if _SHARD_RE.match(f) and f not in keep)
  if stale:
    raise errors.DataError(
      f"--output_dir={output_dir} already holds shards of another layout ({stale[0]}, "
      f"{len(stale)} in all) that train-*/eval-* globs would mix in: remove them or use a new dir"
    )


def _check_world_json(path: str, output_dir: str) -> None:
  """Refuses a --world_json inside --output_dir (whose globs must see shards only) or in a
  directory that cannot be written."""
  inside = os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
  if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
    raise errors.ConfigError(
      f"--world_json={path} is inside --output_dir={output_dir}, whose DIR/* globs must see "
      "shards only: put it elsewhere"
    )
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    why = "is a directory" if os.path.isdir(path) else f"{parent} is not a writable directory"
    raise errors.DataError(f"--world_json={path}: cannot write: {why}")


def _write_world_json(world: World, path: str, seed: int, fmt: str, frames, splits) -> None:
  """Records the class kinds and generation settings next to the shards."""
  info = {
    "generator": "mfb_jax.synthetic",
    "seed": seed,
    "format": fmt,
    "num_classes": world.num_classes,
    "frames": list(frames),
    "videos": splits,
    "classes_by_kind": {kind: world.ids(kind) for kind in KINDS},
    "params": {k: v for k, v in vars(world.params).items()},
  }
  try:
    with open(path, "w") as f:
      json.dump(info, f, indent=1)
  except OSError as e:
    raise errors.DataError(f"--world_json={path}: cannot write: {e}") from e


def validate(
  num_train: int,
  num_eval: int,
  num_shards: int,
  num_eval_shards: int,
  seed: int,
  num_classes: int,
  frames: tuple[int, int],
  fmt: str,
) -> None:
  """Raises ConfigError naming the first bad value as its command-line flag."""
  min_frames, max_frames = frames
  checks = [
    (num_train >= 0, "num_train", num_train, "must be >= 0"),
    (num_eval >= 0, "num_eval", num_eval, "must be >= 0"),
    (num_train + num_eval > 0, "num_train", num_train, "--num_train and --num_eval are both 0"),
    (1 <= num_shards <= 99999, "num_shards", num_shards, "must be in [1, 99999]"),
    (1 <= num_eval_shards <= 99999, "num_eval_shards", num_eval_shards, "must be in [1, 99999]"),
    (num_classes >= len(KINDS), "num_classes", num_classes, f"must be >= {len(KINDS)}"),
    # Each class that occurs has prototypes in memory (1e8 classes: 38 GiB); YouTube-8M: 4716.
    (num_classes <= 1_000_000, "num_classes", num_classes, "must be <= 1000000"),
    (min_frames >= 1, "min_frames", min_frames, "must be >= 1"),
    (max_frames >= min_frames, "max_frames", max_frames, f"must be >= {min_frames}"),
    (max_frames <= 100_000, "max_frames", max_frames, "must be <= 100000"),
    (seed >= 0, "seed", seed, "must be >= 0"),
    (fmt in ("frame", "video"), "format", fmt, "must be 'frame' or 'video'"),
  ]
  for ok, name, value, why in checks:
    if not ok:
      raise errors.ConfigError(f"--{name}={value}: {why}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    params = Params(active_fraction=FLAGS.active_fraction, labels_per_video=FLAGS.labels_per_video)
    write_dataset(
      FLAGS.output_dir,
      num_train=FLAGS.num_train,
      num_eval=FLAGS.num_eval,
      num_shards=FLAGS.num_shards,
      num_eval_shards=FLAGS.num_eval_shards,
      seed=FLAGS.seed,
      num_classes=FLAGS.num_classes,
      params=params,
      frames=(FLAGS.min_frames, FLAGS.max_frames),
      fmt=FLAGS.format,
      world_json=FLAGS.world_json,
    )
  except errors.UserError as e:
    cli.fail(str(e))
  except errors.Interrupted as e:  # The shard being written is removed on the way up.
    signals.report(e)


if __name__ == "__main__":
  signals.install()  # Ctrl-C or SIGTERM: one line, exit 130 or 143, no half-written shard.
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
