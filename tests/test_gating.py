"""Context gating against sigmoid(Wx + b) * x, and where the model applies it."""

import functools

import jax
import numpy as np
import pytest

from configs import default, paper
from mfb_jax import gating, model

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T, D, A, C = 2, 4, 6, 5, 9


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def gate_by_hand(x_BxH, p):
  """y_i = sigmoid(sum_j x_j W_ji + b_i) * x_i, unit by unit."""
  W, b = np.asarray(p["gate"]["kernel"], np.float64), np.asarray(p["gate"]["bias"], np.float64)
  y = np.zeros(x_BxH.shape)
  for n, x in enumerate(np.asarray(x_BxH, np.float64)):
    for i in range(x.size):
      y[n, i] = sigmoid(sum(x[j] * W[j, i] for j in range(x.size)) + b[i]) * x[i]
  return y


def random_gate_params(H, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "gate": {
      "kernel": rng.normal(size=(H, H)).astype(np.float32),
      "bias": rng.normal(size=H).astype(np.float32),
    }
  }


def test_context_gating_equals_sigmoid_of_affine_times_input():
  x_BxH = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
  module = gating.ContextGating()
  variables = module.init(jax.random.key(0), x_BxH)
  assert variables["params"]["gate"]["kernel"].shape == (5, 5)
  params = random_gate_params(5)
  out = module.apply({"params": params}, x_BxH)
  np.testing.assert_allclose(out, gate_by_hand(x_BxH, params), rtol=1e-5, atol=1e-6)


def test_bfloat16_gate_stays_close_to_float32():
  x_BxH = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float32)
  params = {"params": random_gate_params(16)}
  out32 = np.asarray(gating.ContextGating().apply(params, x_BxH))
  out16 = gating.ContextGating(dtype=jax.numpy.bfloat16).apply(params, x_BxH)
  assert out16.dtype == np.float32
  np.testing.assert_allclose(out16, out32, atol=5e-2)
  assert np.abs(np.asarray(out16) - out32).max() > 0


def small_config(aggregator="netvlad", fusion="mfb"):
  config = default.get_config()
  config.data.update(rgb_size=D, audio_size=A, num_classes=C)
  config.model.update(aggregator=aggregator, fusion=fusion, context_gating=True)
  config.model.netvlad.num_clusters = 2
  config.model.mfb.update(factor=2, output_dim=4, dropout=0.0)
  return config


def test_model_gates_the_fused_vector_and_the_probabilities():
  config = small_config()
  net = model.build_model(config)
  rng = np.random.default_rng(3)
  rgb, audio = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, A))
  mask = np.ones((B, T), np.float32)
  variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), rgb, audio, mask)
  params = dict(variables["params"])
  assert params["fusion_gate"]["gate"]["kernel"].shape == (4, 4)  # o x o.
  assert params["output_gate"]["gate"]["kernel"].shape == (C, C)
  params["fusion_gate"] = random_gate_params(4, seed=4)
  params["output_gate"] = random_gate_params(C, seed=5)
  probs, state = net.apply(
    {"params": params}, rgb, audio, mask, capture_intermediates=True, mutable=["intermediates"]
  )
  seen = state["intermediates"]
  (fused,) = seen["fusion"]["__call__"]
  (gated,) = seen["fusion_gate"]["__call__"]
  (head_probs,) = seen["classifier"]["__call__"]
  np.testing.assert_allclose(gated, gate_by_hand(fused, params["fusion_gate"]), rtol=1e-5)
  # The classifier reads the gated fused vector ...
  head = net.classifier.apply({"params": params["classifier"]}, gated)
  np.testing.assert_allclose(head_probs, head, rtol=1e-6)
  # ... and its probabilities are gated once more, staying in [0, 1].
  np.testing.assert_allclose(probs, gate_by_hand(head_probs, params["output_gate"]), rtol=1e-5)
  assert (np.asarray(probs) >= 0).all() and (np.asarray(probs) <= 1).all()
  assert np.abs(np.asarray(probs) - np.asarray(head_probs)).max() > 1e-3


def test_without_the_option_there_are_no_gates():
  config = small_config()
  config.model.context_gating = False
  assert not {"fusion_gate", "output_gate"} & set(model.variable_shapes(config)["params"])


def test_gating_parameters_at_paper_settings_by_hand():
  config = paper.get_config("dbof,mfb")
  config.model.context_gating = True
  fused_gate = 1024 * 1024 + 1024  # MFB's o = 1024.
  output_gate = 3862 * 3862 + 3862  # One gate per class.
  assert model.count_params(config) == 38_485_356 + fused_gate + output_gate
