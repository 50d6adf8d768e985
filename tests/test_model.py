"""build_model: registries, config validation, composition, masks, dtype, parameter counts."""

import functools

import flax.linen
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default
from mfb_jax import model
from mfb_jax.errors import ConfigError

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T, D, A, C = 3, 7, 6, 5, 11
LENGTHS = (7, 4, 2)


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """Numerics here are compared with loose tolerances only: skip XLA's optimization passes."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def small_config(aggregator="dbof", fusion="mfb", classifier="moe", dtype="float32"):
  config = default.get_config()
  config.data.update(rgb_size=D, audio_size=A, num_classes=C)
  config.model.update(aggregator=aggregator, fusion=fusion, classifier=classifier, dtype=dtype)
  config.model.dbof.hidden_size = 8
  config.model.netvlad.num_clusters = 2
  config.model.mfb.update(factor=2, output_dim=4)
  config.model.fc_concat.hidden_size = 8
  return config


def make_batch(num_frames=T, seed=0):
  rng = np.random.default_rng(seed)
  rgb = rng.normal(size=(B, num_frames, D)).astype(np.float32)
  audio = rng.normal(size=(B, num_frames, A)).astype(np.float32)
  mask = (np.arange(num_frames)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
  rgb[mask == 0] = 99.0  # Garbage in the padding.
  audio[mask == 0] = -99.0
  return rgb, audio, mask


def init(net, rgb, audio, mask):
  # Jitted: one compile instead of dozens of op-by-op ones.
  return jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), rgb, audio, mask)


def apply(net, variables, *inputs, **kwargs):
  """net.apply, jitted (keyword arguments such as train and mutable are fixed, not traced)."""
  return jax.jit(functools.partial(net.apply, **kwargs))(variables, *inputs)


@pytest.mark.parametrize(
  "field, registry",
  [("aggregator", model.AGGREGATORS), ("fusion", model.FUSIONS), ("classifier", model.CLASSIFIERS)],
)
def test_unknown_registry_name_lists_the_choices(field, registry):
  config = small_config()
  config.model[field] = "no_such_module"
  with pytest.raises(ValueError, match="no_such_module") as error:
    model.build_model(config)
  assert f"config.model.{field}" in str(error.value)
  assert ", ".join(sorted(registry)) in str(error.value)


@pytest.mark.parametrize(
  "section, field, value, message",
  [
    ("model", "dtype", "float16", "bfloat16, float32"),
    ("model.dbof", "hidden_size", 0, "positive integer"),
    ("model.mfb", "dropout", 1.0, r"\[0, 1\)"),
    ("model.moe", "l2_penalty", -1.0, ">= 0"),
  ],
)
def test_bad_values_fail_at_build_time(section, field, value, message):
  config = small_config()
  config_section = config
  for part in section.split("."):
    config_section = config_section[part]
  config_section[field] = value
  with pytest.raises(ConfigError, match=message):
    model.build_model(config)


def test_unknown_module_field_is_named():
  config = small_config()
  config.model.mfb.rank = 3
  with pytest.raises(ConfigError, match="config.model.mfb: MFB takes no field 'rank'"):
    model.build_model(config)


@pytest.mark.parametrize(
  "aggregator, fusion", [("avgpool", "fc_concat"), ("dbof", "mfb"), ("netvlad", "concat")]
)
def test_probabilities_ignore_padding_in_train_and_eval(aggregator, fusion):
  net = model.build_model(small_config(aggregator, fusion))
  rgb, audio, mask = make_batch()
  variables = init(net, rgb, audio, mask)
  long_rgb, long_audio, long_mask = make_batch(num_frames=T + 4)
  long_rgb[:, :T], long_audio[:, :T] = rgb, audio  # Same videos, more (garbage) padding.
  for train in (False, True):
    rngs = {"dropout": jax.random.key(1)}
    short, _ = apply(net, variables, rgb, audio, mask, train=train, rngs=rngs, mutable=True)
    long, _ = apply(
      net, variables, long_rgb, long_audio, long_mask, train=train, rngs=rngs, mutable=True
    )
    assert short.dtype == np.float32 and short.shape == (B, C)
    assert (np.asarray(short) >= 0).all() and (np.asarray(short) <= 1).all()
    np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-6)


def _unit(rgb, audio):
  """Independent of the model: each frame's [rgb; audio] / its L2 norm, in float64."""
  both = np.concatenate([rgb, audio], -1).astype(np.float64)
  norm = np.sqrt(np.maximum((both**2).sum(-1, keepdims=True), 1e-12))
  return rgb / norm, audio / norm


def test_unit_frames_scale_each_frames_rgb_and_audio_together():
  rgb, audio, _ = make_batch()
  rgb[0, 1], audio[0, 1] = 0.0, 0.0  # A zero (padded) frame stays zero, not NaN.
  got_rgb, got_audio = model.unit_frames(rgb, audio)
  want_rgb, want_audio = _unit(rgb, audio)
  np.testing.assert_allclose(got_rgb, want_rgb, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_audio, want_audio, rtol=1e-6, atol=1e-7)
  assert not np.asarray(got_rgb)[0, 1].any() and not np.asarray(got_audio)[0, 1].any()
  bf16_rgb, _ = model.unit_frames(rgb.astype(jax.numpy.bfloat16), audio)
  assert bf16_rgb.dtype == jax.numpy.bfloat16  # A bfloat16 model's frames stay bfloat16.


class _MeanFrames(flax.linen.Module):
  """A frame-level fusion that feels each frame's scale (FrameMFB normalizes every fused frame,
  so its output barely does): the mean of the masked frames, rgb and audio side by side."""

  @flax.linen.compact
  def __call__(self, rgb_BxTxD, audio_BxTxA, mask_BxT, train=False):
    both_BxTxF = jax.numpy.concatenate([rgb_BxTxD, audio_BxTxA], -1) * mask_BxT[:, :, None]
    return flax.linen.Dense(4)(both_BxTxF.sum(1) / mask_BxT.sum(1, keepdims=True))


@pytest.mark.parametrize("fusion_level", ["video", "frame"])
def test_normalize_frames_gives_the_model_unit_frames(fusion_level):
  config = small_config()
  config.model.update(fusion_level=fusion_level, normalize_frames=True)
  config.model.frame_mfb.update(factor=2, output_dim=4)
  normalized = model.build_model(config)
  config.model.normalize_frames = False
  plain = model.build_model(config)
  if fusion_level == "frame":
    normalized, plain = normalized.clone(fusion=_MeanFrames()), plain.clone(fusion=_MeanFrames())
  rgb, audio, mask = make_batch()
  rgb[mask == 0], audio[mask == 0] = 0.0, 0.0  # The pipeline's padding.
  variables = init(plain, rgb, audio, mask)
  # The same variables: a run can resume with the option turned on or off.
  same = jax.tree.structure(init(normalized, rgb, audio, mask)) == jax.tree.structure(variables)
  assert same
  got = apply(normalized, variables, rgb, audio, mask, train=False)
  want = apply(plain, variables, *_unit(rgb, audio), mask, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, apply(plain, variables, rgb, audio, mask, train=False), atol=1e-3)
  del config.model["normalize_frames"]  # A config file's own value, not typed by ConfigDict.
  config.model.normalize_frames = 1
  with pytest.raises(ConfigError, match="normalize_frames must be True or False, got 1"):
    model.build_model(config)


def test_train_mode_reports_penalty_and_batch_stats():
  net = model.build_model(small_config("dbof", "mfb"))
  rgb, audio, mask = make_batch()
  variables = init(net, rgb, audio, mask)
  assert set(variables) == {"params", "batch_stats"}
  _, updates = apply(
    net,
    variables,
    rgb,
    audio,
    mask,
    train=True,
    rngs={"dropout": jax.random.key(1)},
    mutable=["batch_stats", "losses"],
  )
  (l2,) = updates["losses"]["classifier"]["l2"]
  assert float(l2) > 0
  old = variables["batch_stats"]["rgb_aggregator"]["bn"]["mean"]
  assert np.abs(updates["batch_stats"]["rgb_aggregator"]["bn"]["mean"] - old).max() > 0


def test_single_modality_model_has_no_unused_aggregator():
  net = model.build_model(small_config("netvlad", "audio"))
  rgb, audio, mask = make_batch()
  variables = init(net, rgb, audio, mask)
  assert "rgb_aggregator" not in variables["params"]
  out = apply(net, variables, rgb, audio, mask)
  out_other_rgb = apply(net, variables, rgb + 1.0, audio, mask)
  np.testing.assert_array_equal(out, out_other_rgb)


def test_bfloat16_keeps_float32_params_and_outputs_close_to_float32():
  rgb, audio, mask = make_batch()
  net32 = model.build_model(small_config("netvlad", "mfb"))
  net16 = model.build_model(small_config("netvlad", "mfb", dtype="bfloat16"))
  variables = init(net32, rgb, audio, mask)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(init(net16, rgb, audio, mask)))
  out32 = apply(net32, variables, rgb, audio, mask)
  out16 = apply(net16, variables, rgb, audio, mask)
  assert out16.dtype == np.float32
  np.testing.assert_allclose(out16, out32, atol=3e-2)
  assert np.abs(np.asarray(out16) - np.asarray(out32)).max() > 0  # bf16 really used.


def test_count_params_equals_initialized_parameters():
  config = small_config("dbof", "fc_concat", "logistic")
  rgb, audio, mask = make_batch()
  variables = init(model.build_model(config), rgb, audio, mask)
  by_hand = (D * 8 + 2 * 8) + (A * 8 + 2 * 8) + 2 * (8 * 8 + 8) + (16 * C + C)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == by_hand
  assert model.count_params(config) == by_hand


def test_count_command_prints_all_paper_cells(capsys):
  model.main(["--count"])
  rows = capsys.readouterr().out.strip().splitlines()[1:]
  print("\n".join(rows))  # The table, visible with pytest -s.
  assert len(rows) == 15
  assert any(r.split()[:2] == ["netvlad,mfb", "57,556,540"] for r in rows)
  assert any(r.split()[:2] == ["dbof,mfb", "38,485,356"] for r in rows)


class _Frames(flax.linen.Module):
  """An aggregator that forgets to pool over frames."""

  def __call__(self, x_BxTxF, mask_BxT, train=False):
    return x_BxTxF


class _Block(flax.linen.Module):
  """A fusion that returns a [B, 1, O] block (the classifier would flatten it into 1 row)."""

  def __call__(self, video_BxV, audio_BxA, train=False):
    return jax.numpy.concatenate([video_BxV, audio_BxA], -1)[:, None, :]


class _Sized(flax.linen.Module):
  """A fusion with a field that has no default."""

  dim: int

  def __call__(self, video_BxV, audio_BxA, train=False):
    return video_BxV[:, : self.dim]


def test_a_new_module_that_breaks_the_contract_is_one_line(monkeypatch):
  monkeypatch.setattr(model, "AGGREGATORS", {**model.AGGREGATORS, "frames": _Frames})
  monkeypatch.setattr(model, "FUSIONS", {**model.FUSIONS, "block": _Block, "sized": _Sized})
  inputs = make_batch()
  for aggregator, fusion, message in [
    ("frames", "concat", f"aggregator _Frames returned shape {(B, T, D)} for a batch of {B}; "),
    ("avgpool", "block", f"fusion _Block returned shape {(B, 1, D + A)} for a batch of {B}; "),
  ]:
    net = model.build_model(small_config(aggregator, fusion))
    with pytest.raises(ConfigError) as error:
      init(net, *inputs)
    assert str(error.value) == message + "it must return one vector per video, [batch, size]"
  with pytest.raises(ConfigError, match=r"config.model.sized: _Sized needs a value for dim, "):
    model.build_model(small_config("avgpool", "sized"))
  config = small_config("avgpool", "sized")
  config.model.sized = {"dim": 2}
  assert init(model.build_model(config), *inputs)["params"]  # Set: it builds and runs.


@pytest.mark.parametrize(
  "aggregator, fusion, classifier",
  [("dbof", "mfb", "moe"), ("netvlad", "mfb", "logistic"), ("avgpool", "fc_concat", "moe")],
)
def test_train_step_runs_on_an_explicitly_sharded_batch(aggregator, fusion, classifier):
  """As train.py shards it (jax.make_mesh: explicit axes); same loss and grads as unsharded."""
  net = model.build_model(small_config(aggregator, fusion, classifier))
  inputs = make_batch()
  variables = init(net, *inputs)

  def loss(params, key, rgb, audio, mask):
    probs, updates = net.apply(
      {**variables, "params": params},
      rgb,
      audio,
      mask,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats", "losses"],
    )
    return jax.numpy.sum(probs) + sum(jax.tree.leaves(updates["losses"])), updates

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  key = jax.random.key(1)
  expected = step(variables["params"], key, *inputs)
  mesh = jax.make_mesh((1,), ("data",))
  # Parameters and the rng replicated on the mesh, the batch split on 'data' (as the state and
  # batches of the train step).
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params, key = jax.device_put((variables["params"], key), replicated)
  sharded = step(params, key, *(jax.device_put(x, data) for x in inputs))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, expected
  )
