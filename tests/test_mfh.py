"""MFH against a NumPy formula written block by block; the paper config's mfh and nextvlad cells."""

import functools

import jax
import numpy as np
import pytest

from configs import paper
from mfb_jax import fusion, mfh, model, sweep_report
from mfb_jax.errors import ConfigError

jax.config.update("jax_numpy_rank_promotion", "raise")

B, V, A = 3, 6, 5  # Batch, aggregated video size, aggregated audio size.
K_FACTOR, OUT = 3, 4  # k and o of every block.


def make_vectors(seed: int = 0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, V)).astype(np.float32), rng.normal(size=(B, A)).astype(np.float32)


def init(module, video_BxV, audio_BxA):
  return jax.jit(functools.partial(module.init, train=False))(
    jax.random.key(0), video_BxV, audio_BxA
  )


def with_random_biases(variables, seed: int = 1):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  for layer in params.values():
    layer["bias"] = rng.normal(size=layer["bias"].shape).astype(np.float32)
  return {"params": params}


def mfh_by_hand(l_BxV, a_BxA, params, order):
  """Block i, output j: sum over the k elements e of group j of prod_{m<=i} u_m[e] * v_m[e]."""
  out = np.zeros((B, order * OUT))
  for b in range(B):
    video, audio = l_BxV[b].astype(np.float64), a_BxA[b].astype(np.float64)
    u = [video @ params[f"U_{m}"]["kernel"] + params[f"U_{m}"]["bias"] for m in range(order)]
    v = [audio @ params[f"V_{m}"]["kernel"] + params[f"V_{m}"]["bias"] for m in range(order)]
    for i in range(order):
      block = np.zeros(OUT)
      for j in range(OUT):
        for e in range(j * K_FACTOR, (j + 1) * K_FACTOR):
          block[j] += np.prod([u[m][e] * v[m][e] for m in range(i + 1)])
      block = np.maximum(block, 0.0)
      norm = np.linalg.norm(block)
      out[b, i * OUT : (i + 1) * OUT] = block / norm if norm > 0 else block
  return out


@pytest.mark.parametrize("order", [2, 3])
def test_mfh_equals_cascaded_blocks_by_hand(order):
  l_BxV, a_BxA = make_vectors()
  module = mfh.MFH(factor=K_FACTOR, output_dim=OUT, order=order, dropout=0.1)
  variables = with_random_biases(init(module, l_BxV, a_BxA))
  out = module.apply(variables, l_BxV, a_BxA, train=False)
  assert out.shape == (B, order * OUT)
  expected = mfh_by_hand(l_BxV, a_BxA, variables["params"], order)
  for i in range(order):
    assert (expected[:, i * OUT : (i + 1) * OUT] > 0).any(), f"block {i} is all zero: no test"
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_mfh_of_order_one_is_mfb():
  l_BxV, a_BxA = make_vectors()
  module = mfh.MFH(factor=K_FACTOR, output_dim=OUT, order=1)
  variables = with_random_biases(init(module, l_BxV, a_BxA))
  p = variables["params"]
  mfb_params = {"params": {"U": p["U_0"], "V": p["V_0"]}}
  mfb_out = fusion.MFB(factor=K_FACTOR, output_dim=OUT).apply(mfb_params, l_BxV, a_BxA)
  np.testing.assert_allclose(module.apply(variables, l_BxV, a_BxA), mfb_out, rtol=1e-6)


def test_mfh_dropout_only_in_training_on_the_whole_output():
  l_BxV, a_BxA = make_vectors()
  module = mfh.MFH(factor=K_FACTOR, output_dim=32, dropout=0.5)
  variables = init(module, l_BxV, a_BxA)
  clean = np.asarray(module.apply(variables, l_BxV, a_BxA, train=False))
  dropped = np.asarray(
    module.apply(variables, l_BxV, a_BxA, train=True, rngs={"dropout": jax.random.key(3)})
  )
  kept = dropped != 0
  for block in (slice(0, 32), slice(32, 64)):  # Both blocks lose units.
    assert (~kept[:, block] & (clean[:, block] != 0)).any()
  np.testing.assert_allclose(dropped[kept], clean[kept] / 0.5, rtol=1e-6)


def test_paper_config_accepts_the_new_cells_without_a_paper_gap():
  assert "nextvlad,mfb" in paper.BEYOND_ARGS and "dbof,mfh" in paper.BEYOND_ARGS
  assert not set(paper.BEYOND_ARGS) & set(paper.ARGS)
  for arg in paper.BEYOND_ARGS:
    config = paper.get_config(arg)
    assert f"{config.model.aggregator},{config.model.fusion}" == arg
    assert arg not in paper.PAPER_GAP
    assert sweep_report.paper_gap(*arg.split(",")) is None
  # The sweep's default grid stays the paper's 3 x 5.
  assert sweep_report.AGGREGATIONS == ("avgpool", "netvlad", "dbof")
  assert sweep_report.FUSIONS == ("audio", "video", "concat", "fc_concat", "mfb")
  with pytest.raises(ConfigError, match=r"netvlad, dbof, nextvlad\}.*mfb, mfh\}"):
    paper.get_config("nextvlad,mfx")


@pytest.mark.parametrize("arg", paper.BEYOND_ARGS)
def test_beyond_paper_cells_build(arg):
  config = paper.get_config(arg)
  config.lock()
  net = model.build_model(config)
  inputs = model.input_shapes(config, 2, 4)
  variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), *inputs)
  probs = jax.eval_shape(functools.partial(net.apply, train=False), variables, *inputs)
  assert probs.shape == (2, 3862)


def test_dbof_mfh_parameter_count_by_hand():
  """dbof,mfb plus a second U, V pair (2000 -> 4096 each) and a MoE 1024 inputs wider."""
  dbof_mfb = 38_485_356  # tests/test_configs.py checks this one against the peers.
  second_block = 2 * (2000 * 4096 + 4096)
  wider_moe = 1024 * 3862 * (3 + 2)  # Gates (E+1 = 3 per class) and experts (E = 2).
  assert model.count_params(paper.get_config("dbof,mfh")) == dbof_mfb + second_block + wider_moe


def test_mfh_order_must_be_positive():
  config = paper.get_config("dbof,mfh")
  config.model.mfh.order = 0
  with pytest.raises(ConfigError, match="config.model.mfh.order must be a positive integer"):
    model.build_model(config)


def test_huge_orders_and_sizes_are_refused_before_anything_is_built():
  # order=100000 traced for hours without a word; factor=1e12 aborted the process in XLA.
  config = paper.get_config("dbof,mfh")
  config.model.mfh.order = 17
  with pytest.raises(ConfigError, match=r"^config.model.mfh.order=17 is invalid; it must be at"):
    model.build_model(config)
  config.model.mfh.order, config.model.mfh.factor = 2, 10**12
  with pytest.raises(ConfigError, match=r"^config.model.mfh.factor=1000000000000 is invalid; it "):
    model.build_model(config)
