"""Start-up validation of config values: each bad value fails with one line naming the field."""

import math

import ml_collections
from absl import logging

from mfb_jax import config_fields, file_patterns
from mfb_jax.errors import ConfigError

FORMATS = ("frame", "video")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("float32", "tensorfloat32", "default")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential")
MODES = ("train", "eval", "predict", "bench")


def _choice(config, field: str, allowed) -> None:
  value = _get(config, field)
  if value not in allowed:
    raise ConfigError(
      f"config.{field}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}"
    )


# What a user who asks for 0 (none) of these means, and how to get it.
_INSTEAD = {
  "train.eval_every": "to evaluate only at the end, set it to train.num_steps",
  "train.checkpoint_every": "to save only at the end, set it to train.num_steps",
}


def _positive(config, field: str, minimum: float = 1, strict: bool = False) -> None:
  value = _get(config, field)
  ok = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
  ok = ok and not isinstance(value, bool)
  ok = ok and (value > minimum if strict else value >= minimum)
  if not ok:
    relation = ">" if strict else ">="
    instead = f" ({_INSTEAD[field]})" if field in _INSTEAD else ""
    raise ConfigError(
      f"config.{field}={value!r} is invalid; it must be a finite number {relation} {minimum}"
      f"{instead}"
    )


def _below_2_31(config, field: str) -> None:
  """TensorFlow's shapes are int32: larger values wrap (or fail deep in the input pipeline)."""
  if _get(config, field) >= 2**31:
    raise ConfigError(f"config.{field}={_get(config, field)!r} is invalid; it must be < 2**31")


def _fraction(config, field: str) -> None:
  value = _get(config, field)
  if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
    raise ConfigError(f"config.{field}={value!r} is invalid; it must be a number in [0, 1)")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
  """Raises ConfigError on the first invalid value."""
  from mfb_jax import model as model_lib  # Deferred: the registries import flax.
  from mfb_jax import module_config

  config_fields.check(config, mode)
  _choice(config, "data.format", FORMATS)
  for field in ("data.num_classes", "data.max_frames", "data.rgb_size", "data.audio_size"):
    _positive(config, field)
    _below_2_31(config, field)
  _positive(config, "data.shuffle_buffer")
  _positive(config, "data.prefetch_batches", 0)
  _choice(config, "model.aggregator", sorted(model_lib.AGGREGATORS))
  _choice(config, "model.fusion", sorted(model_lib.FUSIONS))
  _choice(config, "model.classifier", sorted(model_lib.CLASSIFIERS))
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.matmul_precision", MATMUL_PRECISIONS)
  if config.model.get("fusion_level", "video") == "frame" and config.data.format == "video":
    raise ConfigError(
      "config.model.fusion_level='frame' needs frame-level data (data.format='frame'): a "
      "video-level record holds one mean vector per video, no frames to fuse"
    )
  model_lib.build_model(config)  # The module sections' values and fields (no arrays made).
  for name, cls in model_lib.module_sections().items():  # Those of modules not used too: a bad
    module_config.check_section(cls, name, config)  # value there is a mistake all the same.
  _positive(config, "optim.learning_rate", 0, strict=True)
  for field in ("optim.b1", "optim.b2"):
    _fraction(config, field)
  _positive(config, "optim.eps", 0, strict=True)
  _choice(config, "optim.schedule", SCHEDULES)
  _positive(config, "optim.warmup_steps", 0)
  _positive(config, "optim.grad_clip_norm", 0)
  for field in ("train.batch_size", "train.eval_every", "train.checkpoint_every"):
    _positive(config, field)
  for field in ("train.keep_checkpoints", "train.log_every", "eval.batch_size"):
    _positive(config, field)
  for field in ("train.batch_size", "eval.batch_size"):
    _below_2_31(config, field)
  _positive(config, "train.num_steps", 0)  # 0: evaluates the initial model.
  _below_2_31(config, "train.num_steps")  # The state's step counter is an int32.
  _decay_settings(config)
  _schedule_fits(config)
  if mode == "train":
    _unused_schedule_settings(config)
  seed = config.get("seed", 0)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
    raise ConfigError(f"config.seed={seed!r} is invalid; it must be an integer in [0, 2**63)")
  _positive(config, "eval.max_examples", 0)
  for field in ("eval.top_k", "predict.top_k"):
    _positive(config, field)
    if _get(config, field) > config.data.num_classes:
      raise ConfigError(f"config.{field} must be <= data.num_classes ({config.data.num_classes})")
  _choice({"mode": mode}, "mode", MODES)
  if mode == "bench":
    _positive(config, "bench.steps")
    _positive(config, "bench.warmup_steps", 0)
  _check_patterns(config, mode)


def check_model_shapes(config: ml_collections.ConfigDict) -> None:
  """Traces the model's init on inputs of the shapes the pipeline gives it (jax.eval_shape: no
  arrays made, 0.1-0.3 s for the paper's models): a NeXtVLAD whose groups do not divide its
  width, or an aggregator or fusion that breaks the [batch, size] contract, is one line before
  the workdir is written (it was found at the first init, about 8 s in). Tracing may start JAX's
  backend (DBoF asks for the device count), so launch.py calls this after
  jax.distributed.initialize, not in validate()."""
  from mfb_jax import model as model_lib
  from mfb_jax import train as train_lib

  # The sizes of train.init_state's first init.
  model_lib.variable_shapes(config, batch_size=2, num_frames=train_lib.frames_per_example(config))


def _decay_settings(config) -> None:
  """The exponential schedule's settings: checked whatever the schedule (as warmup_steps is, a
  bad value is a mistake all the same); a config from before them lacks them, which only the
  exponential schedule minds."""
  optim = config.optim
  lacking = [f"config.optim.{f}" for f in ("decay_rate", "decay_steps") if f not in optim]
  if lacking:
    if optim.schedule == "exponential":
      raise ConfigError(
        f"config.optim.schedule='exponential' needs {' and '.join(lacking)} "
        "(configs/default.py has them)"
      )
    return
  rate = optim.decay_rate
  if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
    raise ConfigError(
      f"config.optim.decay_rate={rate!r} is invalid; it must be a number in (0, 1] (the "
      "learning rate is multiplied by it every optim.decay_steps steps)"
    )
  _positive(config, "optim.decay_steps")
  _below_2_31(config, "optim.decay_steps")


def _unused_schedule_settings(config) -> None:
  """A warning for a schedule's setting changed while another schedule is chosen: a run given
  optim.decay_steps without optim.schedule='exponential' trained at a constant rate, untold."""
  from configs import default  # Deferred: configs/ is not part of the mfb_jax package.

  reference, optim = default.get_config().optim, config.optim
  used_by = {
    "warmup_steps": "warmup_cosine",
    "decay_rate": "exponential",
    "decay_steps": "exponential",
  }
  for name, schedule in used_by.items():
    if name in optim and optim.schedule != schedule and optim[name] != reference[name]:
      logging.warning(
        "config.optim.%s=%r is set, but optim.schedule=%r does not use it (%r does)",
        name,
        optim[name],
        optim.schedule,
        schedule,
      )


def _schedule_fits(config) -> None:
  """The cosine schedules decay over the steps after the warm-up: there must be some."""
  optim, steps = config.optim, config.train.num_steps
  warmup = optim.warmup_steps if optim.schedule == "warmup_cosine" else 0
  if optim.schedule in ("constant", "exponential") or steps > warmup:
    return
  if warmup:
    raise ConfigError(
      f"config.optim.warmup_steps={warmup} must be below train.num_steps={steps}: "
      "optim.schedule='warmup_cosine' decays over the steps after the warm-up"
    )
  raise ConfigError(
    f"config.optim.schedule='cosine' decays over train.num_steps, which is {steps}; it must be > 0"
  )


def _check_patterns(config, mode: str) -> None:
  data = config.data
  for field in ("train_pattern", "eval_pattern", "predict_pattern"):
    value = data.get(field) or ""
    if value and not file_patterns.split(value):  # "," or " ": set, but naming no file.
      # "," was reported later as an empty train/eval pattern, whichever field it was.
      raise ConfigError(
        f"config.data.{field}={value!r} names no file: give a glob (or several, comma-separated)"
      )
  if mode == "train" and not data.train_pattern:
    raise ConfigError("config.data.train_pattern is empty; set it to a glob of training tfrecords")
  if mode == "eval" and not data.eval_pattern:
    raise ConfigError("config.data.eval_pattern is empty; set it to a glob of evaluation tfrecords")
  if mode == "predict" and not (data.predict_pattern or data.eval_pattern):
    raise ConfigError("config.data.predict_pattern and config.data.eval_pattern are both empty")
  if mode == "predict" and config.predict.vocabulary:
    from mfb_jax import vocabulary

    names = vocabulary.load(config.predict.vocabulary)  # Fails now, not after the whole split.
    top = max(names, default=-1)
    if top >= data.num_classes:  # Another dataset version's (2017: 4716 classes, 2018: 3862).
      raise ConfigError(
        f"config.predict.vocabulary={config.predict.vocabulary} names label id {top}, but "
        f"data.num_classes={data.num_classes}: the vocabulary of another version of YouTube-8M?"
      )
    if top + 1 < data.num_classes:  # A partial vocabulary, or another version's.
      logging.warning(
        "config.predict.vocabulary=%s names label ids up to %d, but the model has %d classes "
        "(data.num_classes): ids beyond it are written as 'label N' (another version of "
        "YouTube-8M? 2018: 3862 classes, 2017: 4716)",
        config.predict.vocabulary,
        top,
        data.num_classes,
      )


def check_batch_split(batch_size: int, field: str, process_count: int, device_count: int) -> int:
  """The per-process batch; the global batch must split evenly over processes and devices."""
  if batch_size % device_count or batch_size % process_count:
    raise ConfigError(
      f"config.{field}={batch_size} must be divisible by the number of devices ({device_count}) "
      f"and processes ({process_count})"
    )
  return batch_size // process_count
