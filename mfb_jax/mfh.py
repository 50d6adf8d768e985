"""MFH: cascaded MFB blocks (Yu et al. 2018, "Beyond Bilinear", generalized high-order pooling).

Block i expands both inputs to P = k*o units, multiplies them element-wise and then multiplies
that by block i-1's expanded product, so block i is a polynomial of order i+1 in each input's
projections. Each block is sum-pooled over groups of k, ReLU'd (the video paper's replacement of
power normalization, as our MFB) and L2-normalized; the blocks are concatenated (order*o units).
With order=1 this is exactly our MFB.

Called as a fusion: `mfh(video_BxV, audio_BxA, train=bool) -> fused_BxO` with O = order * o.
Shape letters: B batch, V aggregated video size, A aggregated audio size, P = k*o expanded size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import dense
from mfb_jax.aggregation import l2_normalize
from mfb_jax.fusion import dropout

Dtype = Any


class MFH(nn.Module):
  """Multi-modal factorized high-order pooling: `order` cascaded MFB blocks, concatenated."""

  factor: int = 4  # k of every block (the MFH paper: k=5, o=1000, order 2).
  output_dim: int = 1024  # o of every block; the fused vector has order * o units.
  order: int = 2  # Number of cascaded MFB blocks.
  dropout: float = 0.1  # On the concatenated output, where our MFB applies its dropout.
  dtype: Dtype = jnp.float32  # Matmul dtype; products and normalizations run in float32.

  @nn.compact
  def __call__(self, video_BxV: jax.Array, audio_BxA: jax.Array, train: bool = False) -> jax.Array:
    k, o = self.factor, self.output_dim
    expanded_BxP = None
    blocks = []
    for i in range(self.order):
      video_BxP = dense.Dense(k * o, dtype=self.dtype, name=f"U_{i}")(video_BxV).astype(jnp.float32)
      audio_BxP = dense.Dense(k * o, dtype=self.dtype, name=f"V_{i}")(audio_BxA).astype(jnp.float32)
      product_BxP = video_BxP * audio_BxP
      # The cascade: block i carries the expanded (pre-pooling) product of block i-1.
      expanded_BxP = product_BxP if expanded_BxP is None else product_BxP * expanded_BxP
      pooled_BxO = expanded_BxP.reshape(-1, o, k).sum(axis=-1)
      blocks.append(l2_normalize(nn.relu(pooled_BxO), axis=-1))
    fused_BxO = jnp.concatenate(blocks, axis=-1)
    return dropout(self, fused_BxO, self.dropout, train)
