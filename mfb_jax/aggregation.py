"""Temporal aggregation: frame features of one modality -> one video vector (paper, sec. 3.2).

Every aggregator is called as `aggregator(x_BxTxF, mask_BxT, train=bool) -> vec_BxG` and treats
padded frames (mask 0) as absent: adding padding never changes a video's output, and padded frames
never enter DBoF's BatchNorm statistics.

Shape letters: B batch, T frames, F input feature size (D for rgb, A for audio), N = B*T frames
of the batch, H DBoF hidden units, K NetVLAD clusters, G output size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis`; an all-zero vector stays zero."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


class AvgPool(nn.Module):
  """Masked mean over the valid frames (paper, eq. 3)."""

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    # An elementwise masked sum (not an einsum) keeps float32 exact on GPUs that use TF32 dots.
    sum_BxF = jnp.sum(x_BxTxF * mask_BxT[:, :, None], axis=1)
    # A video without valid frames (an eval padding row) gives zeros instead of NaN.
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxT, axis=1, keepdims=True), 1.0)
    return (sum_BxF / count_Bx1).astype(jnp.float32)


class DBoF(nn.Module):
  """Deep Bag of Frames: fc (no bias) -> BatchNorm -> ReLU -> max over valid frames."""

  hidden_size: int = 2000
  momentum: float = 0.99  # BatchNorm running-average decay (flax convention).
  epsilon: float = 1e-3
  dtype: Dtype = jnp.float32  # Matmul dtype; BatchNorm statistics are always float32.

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    B, T, F = x_BxTxF.shape
    # One 2-D (B*T, F) x (F, H) matmul: measured faster on CPU than a 3-D dot_general.
    fc = nn.Dense(self.hidden_size, use_bias=False, dtype=self.dtype, name="fc")
    h_NxH = fc(x_BxTxF.reshape(B * T, F))
    # (B, T) -> (B*T,) then a new axis: a direct reshape to (B*T, 1) has no sharding rule under
    # an explicitly sharded batch.
    valid_Nx1 = (mask_BxT.reshape(B * T) > 0)[:, None]
    bn = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype, name="bn")
    # The mask keeps padded frames out of the batch mean/variance (and so the running stats).
    h_NxH = nn.relu(bn(h_NxH, use_running_average=not train, mask=valid_Nx1))
    # After ReLU every value is >= 0, so zeroing padded frames leaves the max over valid frames
    # unchanged (and a video with no valid frame gives zeros).
    h_BxTxH = (h_NxH * valid_Nx1.astype(h_NxH.dtype)).reshape(B, T, self.hidden_size)
    return jnp.max(h_BxTxH, axis=1).astype(jnp.float32)


class NetVLAD(nn.Module):
  """NetVLAD (paper, eqs. 4-5): soft-assigned residuals to K learnt centres, normalized."""

  num_clusters: int = 8
  dtype: Dtype = jnp.float32  # Matmul dtype; softmax and normalizations run in float32.

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    B, T, F = x_BxTxF.shape
    K = self.num_clusters
    init = nn.initializers.normal(stddev=F**-0.5)
    assign_layer = nn.Dense(K, dtype=self.dtype, kernel_init=init, name="assign")
    logits_NxK = assign_layer(x_BxTxF.reshape(B * T, F)).astype(jnp.float32)
    # Soft assignment with bias; padded frames get zero weight, so they add no residual.
    assign_BxTxK = jax.nn.softmax(logits_NxK, axis=-1).reshape(B, T, K) * mask_BxT[:, :, None]
    centres_KxF = self.param("centres", init, (K, F))
    # sum_t a_tk (x_t - c_k) = sum_t a_tk x_t - (sum_t a_tk) c_k: one batched matmul.
    weighted_BxKxF = jnp.einsum(
      "btk,btf->bkf",
      assign_BxTxK.astype(self.dtype),
      x_BxTxF.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    mass_BxKx1 = jnp.sum(assign_BxTxK, axis=1)[:, :, None]
    vlad_BxKxF = weighted_BxKxF - mass_BxKx1 * centres_KxF[None]
    vlad_BxKxF = l2_normalize(vlad_BxKxF, axis=-1)  # Intra-normalization, per cluster.
    return l2_normalize(vlad_BxKxF.reshape(B, K * F), axis=-1)
