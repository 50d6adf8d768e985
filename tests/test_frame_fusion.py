"""Frame-level MFB: per-frame NumPy MFB then the aggregator's NumPy reference; padding; configs."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default, frame_mfb
from mfb_jax import aggregation, frame_fusion, model
from mfb_jax.errors import ConfigError

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T, D, A, C = 3, 5, 6, 4, 7
LENGTHS = (5, 2, 1)
K_FACTOR, OUT = 2, 3  # Per-frame MFB k and o.


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def make_batch(num_frames: int = T, seed: int = 0):
  rng = np.random.default_rng(seed)
  rgb = rng.normal(size=(B, num_frames, D)).astype(np.float32)
  audio = rng.normal(size=(B, num_frames, A)).astype(np.float32)
  mask = (np.arange(num_frames)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
  rgb[mask == 0] = 77.0  # Garbage in the padding.
  audio[mask == 0] = -55.0
  return rgb, audio, mask


def init_random(module, *inputs, seed: int = 1):
  """Initialized params with random biases in the per-frame MFB."""
  variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  for layer in params["mfb"].values():
    layer["bias"] = rng.normal(size=layer["bias"].shape).astype(np.float32)
  return {**variables, "params": params}


def mfb_of_one_frame(rgb_D, audio_A, p):
  """z_j = sum over i in group j of (U_i . rgb + bu_i)(V_i . audio + bv_i); ReLU; unit norm."""
  z = np.zeros(OUT)
  for j in range(OUT):
    for i in range(j * K_FACTOR, (j + 1) * K_FACTOR):
      u = rgb_D @ p["U"]["kernel"][:, i] + p["U"]["bias"][i]
      v = audio_A @ p["V"]["kernel"][:, i] + p["V"]["bias"][i]
      z[j] += u * v
  z = np.maximum(z, 0.0)
  return z / np.linalg.norm(z) if z.any() else z


def fused_valid_frames(rgb, audio, params):
  """Per video, the list of fused vectors of its valid frames (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["mfb"])
  return [
    np.stack([mfb_of_one_frame(rgb[b, t].astype(np.float64), audio[b, t], p) for t in range(n)])
    for b, n in enumerate(LENGTHS)
  ]


def netvlad_of_frames(frames_nxO, p):
  """NetVLAD of one video's frames, cluster by cluster."""
  K = p["centres"].shape[0]
  vlad = np.zeros((K, OUT))
  for h in frames_nxO:
    scores = np.exp(h @ p["assign"]["kernel"] + p["assign"]["bias"])
    for k in range(K):
      vlad[k] += scores[k] / scores.sum() * (h - p["centres"][k])
  vlad /= np.linalg.norm(vlad, axis=1, keepdims=True)
  return vlad.reshape(-1) / np.linalg.norm(vlad)


@pytest.mark.parametrize("name", ["avgpool", "netvlad"])
def test_frame_mfb_equals_per_frame_mfb_then_the_aggregator(name):
  rgb, audio, mask = make_batch()
  aggregator = {"avgpool": aggregation.AvgPool(), "netvlad": aggregation.NetVLAD(num_clusters=2)}
  module = frame_fusion.FrameMFB(aggregator[name], factor=K_FACTOR, output_dim=OUT, dropout=0.3)
  variables = init_random(module, rgb, audio, mask)
  out = jax.jit(module.apply)(variables, rgb, audio, mask)
  fused = fused_valid_frames(rgb, audio, variables["params"])
  assert all(f.any() for f in fused), "test needs a non-zero fused frame in every video"
  if name == "avgpool":
    expected = np.stack([f.mean(axis=0) for f in fused])
  else:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["aggregator"])
    expected = np.stack([netvlad_of_frames(f, p) for f in fused])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dropout_acts_on_the_aggregated_vector_in_training_only():
  rgb, audio, mask = make_batch()
  module = frame_fusion.FrameMFB(aggregation.AvgPool(), factor=K_FACTOR, output_dim=16, dropout=0.5)
  variables = init_random(module, rgb, audio, mask)
  clean = np.asarray(module.apply(variables, rgb, audio, mask, train=False))
  dropped = np.asarray(
    module.apply(variables, rgb, audio, mask, train=True, rngs={"dropout": jax.random.key(2)})
  )
  kept = dropped != 0
  assert (~kept & (clean != 0)).any()
  # Dropping units of the mean (not of frames): kept units are exactly the mean / keep rate.
  np.testing.assert_allclose(dropped[kept], clean[kept] / 0.5, rtol=1e-6)


def small_config(aggregator: str, context_gating: bool = False):
  config = frame_mfb.get_config(aggregator)
  config.data.update(rgb_size=D, audio_size=A, num_classes=C)
  config.model.frame_mfb.update(factor=K_FACTOR, output_dim=4)
  config.model.dbof.hidden_size = 8
  config.model.netvlad.num_clusters = 2
  config.model.nextvlad.update(num_clusters=2, expansion=2, groups=2)
  config.model.context_gating = context_gating
  return config


@pytest.mark.parametrize("aggregator", frame_mfb.ARGS)
def test_frame_model_probabilities_ignore_padding(aggregator):
  net = model.build_model(small_config(aggregator))
  assert isinstance(net, model.FrameFusionClassifier)
  rgb, audio, mask = make_batch()
  variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), rgb, audio, mask)
  long_rgb, long_audio, long_mask = make_batch(num_frames=T + 3, seed=5)
  long_rgb[:, :T], long_audio[:, :T], long_mask[:, :T] = rgb, audio, mask
  for train in (False, True):
    run = jax.jit(
      functools.partial(
        net.apply, train=train, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
      )
    )
    short, short_stats = run(variables, rgb, audio, mask)
    long, long_stats = run(variables, long_rgb, long_audio, long_mask)
    assert short.shape == (B, C) and (np.asarray(short) >= 0).all()
    np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), short_stats, long_stats)


def test_frame_model_has_one_aggregator_over_fused_frames():
  config = small_config("dbof")
  params = model.variable_shapes(config)["params"]
  assert set(params) == {"fusion", "classifier"}
  assert params["fusion"]["aggregator"]["fc"]["kernel"].shape == (4, 8)  # o per frame -> H.
  assert params["fusion"]["mfb"]["U"]["kernel"].shape == (D, K_FACTOR * 4)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("fusion_level", "clip", "fusion_level: got 'clip'; allowed: video, frame"),
    ("fusion", "concat", "fusion='concat' has no frame-level version.*: mfb"),
    ("context_gating", 1, "context_gating must be True or False"),
  ],
)
def test_bad_frame_level_settings_fail_at_build_time(field, value, message):
  config = small_config("avgpool")
  del config.model[field]  # ml_collections would refuse a value of another type.
  config.model[field] = value
  with pytest.raises(ConfigError, match=message):
    model.build_model(config)


def test_frame_config_arguments():
  assert frame_mfb.ARGS == ("avgpool", "dbof", "netvlad", "nextvlad")
  config = frame_mfb.get_config("NetVLAD, mfb")  # As the sweep tool passes AGG,FUSION.
  assert (config.model.aggregator, config.model.fusion_level) == ("netvlad", "frame")
  reference = default.get_config()
  reference.model.update(aggregator="netvlad", fusion_level="frame")
  assert config.to_dict() == reference.to_dict()
  for bad in (None, "vlad", "dbof,concat", "dbof,mfb,moe"):
    with pytest.raises(ConfigError, match="avgpool, dbof, netvlad, nextvlad"):
      frame_mfb.get_config(bad)
  assert "python launch.py --config=configs/frame_mfb.py:dbof" in frame_mfb.__doc__


def test_video_level_is_the_default_and_old_configs_without_the_fields_still_build():
  config = default.get_config()
  assert (config.model.fusion_level, config.model.context_gating) == ("video", False)
  del config.model["fusion_level"], config.model["context_gating"]
  assert isinstance(model.build_model(config), model.VideoClassifier)


@pytest.mark.parametrize(
  "aggregator, fusion_level, fusion, gated, axis_type",
  [
    ("dbof", "frame", "mfb", True, AxisType.Auto),  # As train.py's mesh.
    ("dbof", "frame", "mfb", True, AxisType.Explicit),  # Stricter about reshapes.
    ("nextvlad", "video", "mfh", True, AxisType.Explicit),
  ],
)
def test_train_step_on_a_sharded_batch(aggregator, fusion_level, fusion, gated, axis_type):
  """Loss and gradients under jit on a 'data' mesh equal the unsharded ones."""
  config = small_config(aggregator, context_gating=gated)
  config.model.update(fusion_level=fusion_level, fusion=fusion)
  config.model.mfh.update(factor=2, output_dim=3)
  net = model.build_model(config)
  inputs = make_batch()
  variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), *inputs)

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
  mesh = jax.make_mesh((1,), ("data",), axis_types=(axis_type,))
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params, key = jax.device_put((variables["params"], key), replicated)
  sharded = step(params, key, *(jax.device_put(x, data) for x in inputs))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, expected
  )
