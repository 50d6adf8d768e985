"""Start-up checks of the config (config_checks.py): bad values, missing fields and wrong patterns
are named in one line before anything else runs."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import run_python

from configs import default, paper
from mfb_jax import model

jax.config.update("jax_numpy_rank_promotion", "raise")


def test_a_pattern_of_commas_alone_is_named():
  # predict_pattern="," was reported as "empty file pattern: set data.train_pattern /
  # data.eval_pattern to a glob", naming the wrong fields.
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*", predict_pattern=",")
  with pytest.raises(ConfigError, match=r"^config\.data\.predict_pattern=',' names no file"):
    config_checks.validate(config, "predict")
  config.data.predict_pattern = " "  # Set (it is not the empty default), but to no glob.
  with pytest.raises(ConfigError, match=r"^config\.data\.predict_pattern=' ' names no file"):
    config_checks.validate(config, "predict")
  config.data.predict_pattern = " /data/test*, "  # A trailing comma and spaces are fine.
  config_checks.validate(config, "predict")


@pytest.mark.parametrize("field, value", [("steps", 0), ("warmup_steps", -1)])
def test_bench_mode_rejects_impossible_step_counts(field, value):
  """Zero timed steps used to end in 'no median for empty data'."""
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = default.get_config()
  config.bench[field] = value
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  config_checks.validate(config, "train")  # Only the bench mode reads these fields.
  with pytest.raises(ConfigError, match=rf"config\.bench\.{field}={value} is invalid"):
    config_checks.validate(config, "bench")


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"seed": -1}, r"config\.seed=-1 is invalid"),
    (
      {"optim.schedule": "warmup_cosine", "optim.warmup_steps": 100, "train.num_steps": 100},
      r"optim\.warmup_steps=100 must be below train\.num_steps=100",
    ),
    ({"optim.schedule": "cosine", "train.num_steps": 0}, r"train\.num_steps, which is 0"),
    # A rate that does not decay (or grows, or flips sign) is a mistake; so is decaying never.
    ({"optim.schedule": "exponential", "optim.decay_rate": 0.0}, r"decay_rate=0\.0 .* \(0, 1\]"),
    ({"optim.schedule": "exponential", "optim.decay_rate": 1.5}, r"decay_rate=1\.5 is invalid"),
    ({"optim.schedule": "exponential", "optim.decay_steps": 0}, r"decay_steps=0 is invalid"),
    ({"optim.decay_rate": -1.0}, r"decay_rate=-1\.0 is invalid"),  # Checked under any schedule.
    # An infinite learning rate compiled and trained, then stopped at a NaN loss.
    ({"optim.learning_rate": float("inf")}, r"optim\.learning_rate=inf is invalid; .* finite"),
    # The next ones trained on (NaN: stopped later with a hint at the learning rate), or failed
    # only after TensorFlow's start-up, the workdir made.
    ({"seed": 2**64 - 1}, r"config\.seed=18446744073709551615 is invalid; .* \[0, 2\*\*63\)"),
    ({"optim.b2": float("nan")}, r"config\.optim\.b2=nan is invalid; .* in \[0, 1\)"),
    ({"optim.b1": 1.0}, r"config\.optim\.b1=1\.0 is invalid"),
    ({"optim.eps": -1.0}, r"config\.optim\.eps=-1\.0 is invalid; .* > 0"),
    ({"model.fusion_level": "clip"}, r"config\.model\.fusion_level: got 'clip'"),
    ({"model.moe.num_experts": 0}, r"config\.model\.moe\.num_experts must be a positive"),
    ({"model.moe.l2_penalty": float("nan")}, r"moe\.l2_penalty must be a finite number >= 0"),
    ({"model.moe.expected_labels": float("inf")}, r"moe\.expected_labels must be a finite"),
    ({"model.mfb.output_scale": -1.0}, r"config\.model\.mfb\.output_scale must be a finite .* > 0"),
    # TensorFlow wrapped it to 1215752191 in a shape: "bad record: OOM when allocating".
    ({"data.num_classes": 99999999999}, r"data\.num_classes=99999999999 is invalid; .* < 2\*\*31"),
    # Trained on (its ETA 27810007333755489h); the state's int32 step counter wraps at 2**31.
    ({"train.num_steps": 2**31}, r"train\.num_steps=2147483648 is invalid; it must be < 2\*\*31"),
    # A user asking for no periodic evaluation is told how to get it.
    (
      {"train.eval_every": 0},
      r"eval_every=0 is invalid; .* >= 1 \(to evaluate only at the end, set it to train\.num_",
    ),
    # Trained without a word, on one "frame" per video.
    (
      {"model.fusion_level": "frame", "data.format": "video"},
      r"fusion_level='frame' needs frame-level data \(data\.format='frame'\)",
    ),
  ],
)
def test_values_that_failed_deep_inside_are_named_at_start_up(overrides, message):
  """These used to fail after the workdir was written, or inside optax without a field name."""
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  config_checks.validate(config, "train")
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = functools.reduce(lambda c, k: c[k], parents, config)
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(config, "train")
  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  config.optim.update(schedule="warmup_cosine", warmup_steps=10, learning_rate=2e-4)
  config.train.num_steps = 11  # One step after the warm-up is enough.
  config_checks.validate(config, "train")


def test_a_config_without_some_fields_names_them():
  """A config written for an older version lacked fields: a KeyError deep in the run, exit 1."""
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  del config.optim["b1"], config.model["matmul_precision"], config["bench"]
  del config.model["nextvlad"], config.model["fusion_level"], config["seed"]  # May be left out.
  with pytest.raises(ConfigError) as error:
    config_checks.validate(config, "bench")
  assert str(error.value).startswith(
    "the config has no config.bench, config.model.matmul_precision, config.optim.b1 "
    "(configs/default.py has every field;"
  )
  with pytest.raises(ConfigError, match=r"no config.model.matmul_precision, config.optim.b1 \("):
    config_checks.validate(config, "train")  # Only the bench mode needs config.bench.


def test_the_exponential_schedules_settings_are_needed_only_where_it_is_chosen():
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  del config.optim["decay_rate"], config.optim["decay_steps"]  # A config from before them.
  config_checks.validate(config, "train")
  config.optim.schedule = "exponential"
  with pytest.raises(ConfigError) as error:
    config_checks.validate(config, "train")
  assert str(error.value) == (
    "config.optim.schedule='exponential' needs config.optim.decay_rate and "
    "config.optim.decay_steps (configs/default.py has them)"
  )


def test_a_schedules_setting_given_to_another_schedule_is_warned_about(monkeypatch):
  from mfb_jax import config_checks

  warnings = []
  monkeypatch.setattr(config_checks.logging, "warning", lambda text, *a: warnings.append(text % a))
  config = default.get_config()
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  config.optim.update(decay_steps=1000, warmup_steps=10)  # Schedule left 'constant'.
  config_checks.validate(config, "eval")  # Eval and predict use no optimizer: no word.
  assert warnings == []
  config_checks.validate(config, "train")
  assert warnings == [
    "config.optim.warmup_steps=10 is set, but optim.schedule='constant' does not use it "
    "('warmup_cosine' does)",
    "config.optim.decay_steps=1000 is set, but optim.schedule='constant' does not use it "
    "('exponential' does)",
  ]
  warnings.clear()
  config.optim.update(schedule="exponential", warmup_steps=0)
  config_checks.validate(config, "train")
  assert warnings == []


def test_a_config_file_setting_a_field_default_lacks_names_it(monkeypatch):
  """`c.train.batchsize = 3` in a config file was silently unused (a 250k-step run at batch 128);
  an override of it is refused by the config's lock, a field set in the file was not."""
  import ml_collections

  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  def config_with(section: str, name: str, value):
    config = default.get_config()
    config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
    (config[section] if section else config)[name] = value
    return config

  for section, name, message in [
    (
      "train",
      "batchsize",
      "config.train.batchsize is not a config field (did you mean "
      "train.batch_size? configs/default.py lists every field)",
    ),
    ("model", "hidden_size", "config.model.hidden_size is not a config field (configs/"),
    ("", "optimizer", "config.optimizer is not a config field (did you mean optim?"),
  ]:
    with pytest.raises(ConfigError) as error:
      config_checks.validate(config_with(section, name, 3), "train")
    assert str(error.value).startswith(message)
  # A section under config.model is a registered module's settings (README, "Add your own
  # fusion"); under another name nothing reads it.
  settings = ml_collections.ConfigDict({"dim": 8})
  with pytest.raises(ConfigError, match=r"^config.model.my_fusion names no registered module"):
    config_checks.validate(config_with("model", "my_fusion", settings), "train")
  with pytest.raises(ConfigError, match=r"names no registered .*did you mean model.netvlad\?"):
    config_checks.validate(config_with("model", "netvald", settings), "train")
  monkeypatch.setitem(model.FUSIONS, "my_fusion", model.FUSIONS["fc_concat"])
  sized = ml_collections.ConfigDict({"hidden_size": 8})
  config_checks.validate(config_with("model", "my_fusion", sized), "train")
  # Its fields are checked even where the run does not use it (model.fusion is mfb here).
  with pytest.raises(ConfigError, match=r"^config.model.my_fusion: FcConcat takes no field 'dim'"):
    config_checks.validate(config_with("model", "my_fusion", settings), "train")
  # The section added to configs/default.py itself, under a misspelled name: it was accepted
  # (default.py is the reference), and its dim silently left at the class default.
  real = default.get_config

  def with_section():
    config = real()
    config.model.my_fusoin = ml_collections.ConfigDict({"hidden_size": 8})
    return config

  monkeypatch.setattr(default, "get_config", with_section)
  with pytest.raises(ConfigError, match=r"^config.model.my_fusoin names no .*model.my_fusion\?"):
    config_checks.validate(with_section(), "train")


def test_start_up_checks_leave_jax_unstarted_for_jax_distributed():
  # Every stock config: with the model traced in validate(), DBoF's device count started JAX's
  # backend, and every multi-process run failed in jax.distributed.initialize ("must be called
  # before any JAX calls").
  program = (
    "from configs import default, frame_mfb, paper, tiny; from mfb_jax import config_checks; "
    "from jax._src import xla_bridge; "
    "configs = [paper.get_config(a) for a in paper.ARGS + paper.BEYOND_ARGS]; "
    "configs += [frame_mfb.get_config(a) for a in frame_mfb.ARGS]; "
    "configs += [default.get_config(), tiny.get_config(), tiny.get_config('dbof,mfb')]; "
    "[c.data.update(train_pattern='/data/train*', eval_pattern='') for c in configs]; "
    "[config_checks.validate(c, 'train') for c in configs]; "
    "print(len(configs), xla_bridge.backends_are_initialized())"
  )
  result = run_python(["-c", program], timeout=120)
  assert result.stdout.split()[-1:] == ["False"], result.stderr[-2000:]
  assert int(result.stdout.split()[0]) >= 25


class _PairPool(nn.Module):
  """A user's aggregator that needs an even number of frames: it averages them in pairs."""

  @nn.compact
  def __call__(self, x_BxTxF, mask_BxT, train: bool = False):
    B, T, F = x_BxTxF.shape
    pairs_BxPxF = x_BxTxF.reshape(B, T // 2, 2, F).mean(2)
    mask_BxP = mask_BxT.reshape(B, T // 2, 2).max(2)
    summed_BxF = (nn.Dense(8)(pairs_BxPxF) * mask_BxP[..., None]).sum(1)
    return summed_BxF / jnp.maximum(mask_BxP.sum(1, keepdims=True), 1)


def test_the_model_is_traced_on_the_pipelines_shapes(monkeypatch):
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  # Found when the model was first initialised, after TensorFlow's start-up (about 8 s in).
  config = paper.get_config("nextvlad,mfb")
  config.model.nextvlad.groups = 7
  with pytest.raises(ConfigError, match=r"= 2048 is not divisible by groups=7"):
    config_checks.check_model_shapes(config)
  # Traced on data.max_frames frames, as the first init: with one frame this module failed.
  monkeypatch.setitem(model.AGGREGATORS, "pairpool", _PairPool)
  config = default.get_config()
  config.model.aggregator, config.data.max_frames = "pairpool", 16
  config_checks.check_model_shapes(config)
  config.data.max_frames = 15
  with pytest.raises(TypeError, match="cannot reshape"):
    config_checks.check_model_shapes(config)


def test_a_bad_value_in_a_section_the_model_does_not_use_is_refused():
  # model.mfh.order=100000 with fusion=mfb passed: the run trained MFB as if nothing was wrong.
  from mfb_jax import config_checks
  from mfb_jax.errors import ConfigError

  config = paper.get_config("netvlad,mfb")
  config.data.update(train_pattern="/data/train*", eval_pattern="/data/eval*")
  config_checks.validate(config, "train")
  for field, value, message in [
    ("mfh.order", 100000, r"config.model.mfh.order=100000 is invalid; it must be at most 16"),
    ("dbof.hidden_size", 0, r"config.model.dbof.hidden_size must be a positive integer, got 0"),
    ("logistic.l2_penalty", -1.0, r"config.model.logistic.l2_penalty must be a finite number"),
    ("frame_mfb.dropout", 1.5, r"config.model.frame_mfb.dropout must be in \[0, 1\)"),
  ]:
    bad = copy.deepcopy(config)
    section, name = field.split(".")
    bad.model[section][name] = value
    with pytest.raises(ConfigError, match="^" + message):
      config_checks.validate(bad, "train")
