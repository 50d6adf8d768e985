"""Classifiers against hand formulas (MoE per expert, logistic), and their sown L2 penalty."""

import jax
import numpy as np

from mfb_jax import classifier

jax.config.update("jax_numpy_rank_promotion", "raise")

B, WIDTH, C, E = 3, 6, 11, 2  # WIDTH: size of the fused input (O).


def make_input(seed: int = 0, scale: float = 1.0):
  return (scale * np.random.default_rng(seed).normal(size=(B, WIDTH))).astype(np.float32)


def init(module, x_BxO):
  # Jitted: one compile is faster than running init's many ops one by one.
  return jax.jit(module.init)(jax.random.key(0), x_BxO)


def with_random_biases(variables, seed: int = 1):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  for layer in params.values():
    if "bias" in layer:
      layer["bias"] = rng.normal(size=layer["bias"].shape).astype(np.float32)
  return {"params": params}


def moe_by_hand(x_BxO, params):
  """d_c = sum over real experts e of softmax_e'(gate logits of class c)_e * sigmoid(expert_e,c)."""
  wg = params["gates"]["kernel"].astype(np.float64)
  we = params["experts"]["kernel"].astype(np.float64)
  be = params["experts"]["bias"].astype(np.float64)
  probs = np.zeros((B, C))
  for c in range(C):
    gate_cols = [c * (E + 1) + e for e in range(E + 1)]
    gate_logits = x_BxO @ wg[:, gate_cols]  # B x (E+1), the last one is the dummy gate.
    gate_w = np.exp(gate_logits) / np.exp(gate_logits).sum(axis=1, keepdims=True)
    for e in range(E):
      col = c * E + e
      expert = 1.0 / (1.0 + np.exp(-(x_BxO @ we[:, col] + be[col])))
      probs[:, c] += gate_w[:, e] * expert
  return probs


def test_moe_equals_hand_formula_and_sows_l2():
  x_BxO = make_input()
  module = classifier.MoE(num_classes=C, num_experts=E, l2_penalty=0.25)
  variables = with_random_biases(init(module, x_BxO))
  probs, state = module.apply(variables, x_BxO, mutable=["losses"])
  assert probs.dtype == np.float32 and probs.shape == (B, C)
  np.testing.assert_allclose(probs, moe_by_hand(x_BxO, variables["params"]), rtol=1e-5, atol=1e-6)
  p = variables["params"]
  squares = np.sum(p["gates"]["kernel"] ** 2) + np.sum(p["experts"]["kernel"] ** 2)
  (l2,) = state["losses"]["l2"]
  np.testing.assert_allclose(l2, 0.25 * 0.5 * squares, rtol=1e-5)


def test_moe_probabilities_stay_in_unit_interval_for_large_inputs():
  x_BxO = make_input(scale=1e3)
  module = classifier.MoE(num_classes=C, num_experts=E)
  variables = with_random_biases(init(module, x_BxO))
  probs = np.asarray(module.apply(variables, x_BxO))
  assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0


def test_logistic_equals_hand_formula_and_sows_l2():
  x_BxO = make_input()
  module = classifier.Logistic(num_classes=C, l2_penalty=1e-2)
  variables = with_random_biases(init(module, x_BxO))
  probs, state = module.apply(variables, x_BxO, mutable=["losses"])
  w, b = variables["params"]["logits"]["kernel"], variables["params"]["logits"]["bias"]
  np.testing.assert_allclose(probs, 1.0 / (1.0 + np.exp(-(x_BxO @ w + b))), rtol=1e-5, atol=1e-6)
  (l2,) = state["losses"]["l2"]
  np.testing.assert_allclose(l2, 1e-2 * 0.5 * np.sum(w.astype(np.float64) ** 2), rtol=1e-5)


def test_penalty_is_recorded_only_when_losses_is_mutable_outside_init():
  x_BxO = make_input()
  module = classifier.MoE(num_classes=C)
  variables = init(module, x_BxO)
  # A penalty kept from init would be summed again with the step's own one.
  assert set(variables) == {"params"}
  probs = module.apply(variables, x_BxO)  # Not a tuple: nothing else comes back.
  assert probs.shape == (B, C)


def test_expected_labels_sets_the_initial_output_to_the_label_prior():
  """With zero input only the bias speaks: each class starts at expected_labels / C."""
  num_classes, fused_BxO = 50, np.zeros((2, 7), np.float32)
  for head in (
    classifier.MoE(num_classes=num_classes, num_experts=2, expected_labels=3.0),
    classifier.Logistic(num_classes=num_classes, expected_labels=3.0),
  ):
    variables = head.init(jax.random.key(0), fused_BxO)
    probs_BxC = np.asarray(head.apply(variables, fused_BxO))
    np.testing.assert_allclose(probs_BxC, 3.0 / num_classes, rtol=1e-5)
  zero_bias = classifier.MoE(num_classes=num_classes, num_experts=2)
  probs_BxC = zero_bias.apply(zero_bias.init(jax.random.key(0), fused_BxO), fused_BxO)
  np.testing.assert_allclose(np.asarray(probs_BxC), (2 / 3) * 0.5, rtol=1e-5)  # Starter code.
