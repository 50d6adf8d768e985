"""Video-level classifiers: fused vector -> per-class probabilities in [0, 1] (paper, sec. 3.3).

Every classifier is called as `classifier(fused_BxO, train=bool) -> probs_BxC` (float32) and
reports its weight penalty with `self.sow('losses', 'l2', penalty)`; the train step adds the leaves
of the 'losses' collection to the loss. The penalty is `l2_penalty * 0.5 * sum(w**2)` over the
kernels (TensorFlow's `l2_loss`, as in the YouTube-8M starter code), biases excluded.

Shape letters: B batch, O input size, C classes, E experts.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import dense

Dtype = Any


def l2_loss(*kernels: jax.Array) -> jax.Array:
  """0.5 * the sum of squares of all entries, in float32."""
  return 0.5 * sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in kernels)


def prior_bias(expected_labels: float, num_classes: int, output_share: float = 1.0):
  """Bias initializer so that the initial output is about expected_labels / num_classes.

  The starter code starts every class at probability ~0.5 * output_share; the first thousands
  of steps then only push 3862 logits down. How fast that goes depends on the input's scale: an
  L2-normalized MFB output moves logits ~20x slower per Adam step than raw concatenated features,
  which made short runs compare initializations instead of fusions. 0 keeps the zero bias.
  """
  if expected_labels <= 0:
    return nn.initializers.zeros_init()
  prob = min(expected_labels / num_classes / output_share, 0.5)
  return nn.initializers.constant(math.log(prob) - math.log1p(-prob))


def sow_penalty(module: nn.Module, penalty: jax.Array) -> None:
  """Records `penalty` in 'losses'/'l2', except in `init` (whose variables would carry it stale)."""
  if not module.is_initializing():
    module.sow("losses", "l2", penalty)


class MoE(nn.Module):
  """Mixture of Experts: sum_e softmax(gates)_e * sigmoid(experts_e), with one dummy gate."""

  num_classes: int
  num_experts: int = 2
  l2_penalty: float = 1e-6
  expected_labels: float = 0.0  # Initial labels per video the bias predicts (0: zero bias).
  dtype: Dtype = jnp.float32  # Matmul dtype; softmax, sigmoid and outputs are float32.

  @nn.compact
  def __call__(self, fused_BxO: jax.Array, train: bool = False) -> jax.Array:
    C, E = self.num_classes, self.num_experts
    gate_layer = dense.Dense(C * (E + 1), use_bias=False, dtype=self.dtype, name="gates")
    # At init the gates are uniform, so the real experts share E/(E+1) of the output.
    bias_init = prior_bias(self.expected_labels, C, output_share=E / (E + 1))
    expert_layer = dense.Dense(C * E, dtype=self.dtype, bias_init=bias_init, name="experts")
    # Column c*(E+1)+e is gate e of class c (the starter code's reshape order). The extra gate
    # is the "dummy" expert that always predicts 0, so a class can get little total weight.
    gates_BxCxE1 = gate_layer(fused_BxO).astype(jnp.float32).reshape(-1, C, E + 1)
    experts_BxCxE = expert_layer(fused_BxO).astype(jnp.float32).reshape(-1, C, E)
    weights_BxCxE1 = jax.nn.softmax(gates_BxCxE1, axis=-1)
    probs_BxC = jnp.sum(weights_BxCxE1[:, :, :E] * jax.nn.sigmoid(experts_BxCxE), axis=-1)
    kernels = (gate_layer.variables["params"]["kernel"], expert_layer.variables["params"]["kernel"])
    sow_penalty(self, self.l2_penalty * l2_loss(*kernels))
    return probs_BxC


class Logistic(nn.Module):
  """Logistic regression: one Dense layer and a sigmoid per class."""

  num_classes: int
  l2_penalty: float = 1e-6
  expected_labels: float = 0.0  # Initial labels per video the bias predicts (0: zero bias).
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, fused_BxO: jax.Array, train: bool = False) -> jax.Array:
    bias_init = prior_bias(self.expected_labels, self.num_classes)
    layer = dense.Dense(self.num_classes, dtype=self.dtype, bias_init=bias_init, name="logits")
    logits_BxC = layer(fused_BxO).astype(jnp.float32)
    sow_penalty(self, self.l2_penalty * l2_loss(layer.variables["params"]["kernel"]))
    return jax.nn.sigmoid(logits_BxC)
