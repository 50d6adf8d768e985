"""Context gating (Miech et al. 2017, the YouTube-8M 2017 winner): y = sigmoid(W x + b) * x.

Each unit of x is rescaled by a gate in (0, 1) computed from the whole vector, so a feature (or
a class probability) can be damped or kept depending on the others. The model applies it after
the fusion and on the classifier's probabilities when `config.model.context_gating` is True; on
probabilities in [0, 1] the output stays in [0, 1]. Miech et al. normalize the gate logits with
BatchNorm; we use the bias b of the formula instead (no batch statistics to keep or shard).

Shape letters: B batch, H gated size (the fused size O, or the number of classes C).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import dense

Dtype = Any


class ContextGating(nn.Module):
  """y = sigmoid(W x + b) * x with a square W (H x H)."""

  dtype: Dtype = jnp.float32  # Matmul dtype; the sigmoid and the product run in float32.

  @nn.compact
  def __call__(self, x_BxH: jax.Array) -> jax.Array:
    H = x_BxH.shape[-1]
    # N(0, 1/H) as Miech et al.'s gating weights, so initial gate logits are O(|x|).
    init = nn.initializers.normal(stddev=H**-0.5)
    logits_BxH = dense.Dense(H, dtype=self.dtype, kernel_init=init, name="gate")(x_BxH)
    return jax.nn.sigmoid(logits_BxH.astype(jnp.float32)) * x_BxH.astype(jnp.float32)
