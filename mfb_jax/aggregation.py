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

from mfb_jax import dbof_pool, dense, netvlad_pool

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis`; an all-zero vector stays zero."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


class AvgPool(nn.Module):
  """Masked mean over the valid frames (paper, eq. 3)."""

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    # An elementwise masked sum (not an einsum) keeps float32 exact on GPUs that use TF32 dots;
    # bfloat16 frames are summed in float32.
    x_BxTxF = jnp.asarray(x_BxTxF)
    x_BxTxF = x_BxTxF.astype(jnp.promote_types(x_BxTxF.dtype, jnp.float32))
    sum_BxF = jnp.sum(x_BxTxF * mask_BxT[:, :, None], axis=1)
    # A video without valid frames (an eval padding row) gives zeros instead of NaN.
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxT, axis=1, keepdims=True), 1.0)
    return (sum_BxF / count_Bx1).astype(jnp.float32)


class _DenseVariables(nn.Module):
  """The kernel (and bias) of nn.Dense, same names, inits and rngs, without the layer."""

  shape: tuple[int, int]
  kernel_init: Any = nn.initializers.lecun_normal()
  use_bias: bool = True

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    kernel = self.param("kernel", self.kernel_init, self.shape)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param("bias", nn.initializers.zeros_init(), self.shape[1:])


class _BatchNormVariables(nn.Module):
  """The variables of nn.BatchNorm (params scale/bias, batch_stats mean/var), same names."""

  features: int

  @nn.compact
  def __call__(self):
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,))
    var = self.variable("batch_stats", "var", jnp.ones, (self.features,))
    return scale, bias, mean, var


class DBoF(nn.Module):
  """Deep Bag of Frames: fc (no bias) -> BatchNorm -> ReLU -> max over valid frames.

  By default the layers run fused with a hand-written, exact gradient (mfb_jax/dbof_pool.py:
  1.45x faster on a CPU, no second full-size matmul); `fused_gradient=False` runs the plain flax
  layers and autodiff. Both have the variables of nn.Dense 'fc' and nn.BatchNorm 'bn', so a
  checkpoint of one restores into the other.
  """

  hidden_size: int = 2000
  momentum: float = 0.99  # BatchNorm running-average decay (flax convention).
  epsilon: float = 1e-3
  fused_gradient: bool = True
  dtype: Dtype = jnp.float32  # Matmul dtype; BatchNorm statistics are always float32.

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    if not self.fused_gradient:
      return self._plain(x_BxTxF, mask_BxT, train)
    shape = (x_BxTxF.shape[-1], self.hidden_size)
    kernel_FxH, _ = _DenseVariables(shape, use_bias=False, name="fc")()
    scale_H, bias_H, ra_mean, ra_var = _BatchNormVariables(self.hidden_size, name="bn")()
    x_BxTxF = x_BxTxF.astype(self.dtype)  # The kernel is cast inside (float32 gradient).
    mask_BxT = mask_BxT.astype(jnp.float32)
    if not train:
      return dbof_pool.eval_pool(
        x_BxTxF, mask_BxT, kernel_FxH, ra_mean.value, ra_var.value, scale_H, bias_H, self.epsilon
      )
    # Padded frames stay out of the batch mean/variance (and so the running statistics).
    pooled_BxH, mean_H, var_H = dbof_pool.train_pool(
      x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, self.epsilon
    )
    if not self.is_initializing():
      decay = self.momentum
      ra_mean.value = decay * ra_mean.value + (1 - decay) * jax.lax.stop_gradient(mean_H)
      ra_var.value = decay * ra_var.value + (1 - decay) * jax.lax.stop_gradient(var_H)
    return pooled_BxH

  def _plain(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool) -> jax.Array:
    B, T, F = x_BxTxF.shape
    fc = dense.Dense(self.hidden_size, use_bias=False, dtype=self.dtype, name="fc")
    h_NxH = fc(x_BxTxF.reshape(B * T, F))  # One 2-D matmul: faster on CPU than a 3-D dot.
    # (B, T) -> (B*T,) then a new axis: a direct reshape to (B*T, 1) has no sharding rule under
    # an explicitly sharded batch.
    valid_Nx1 = (mask_BxT.reshape(B * T) > 0)[:, None]
    bn = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype, name="bn")
    # The mask keeps padded frames out of the batch mean/variance (and so the running stats).
    h_NxH = nn.relu(bn(h_NxH, use_running_average=not train, mask=valid_Nx1))
    # After ReLU every value is >= 0, so zeroing padded frames leaves the max over valid frames
    # unchanged (and a video with no valid frame gives zeros).
    h_BxTxH = (h_NxH * valid_Nx1.astype(h_NxH.dtype)).reshape(B, T, self.hidden_size)
    # The max as a gather at the argmax: jnp.max's gradient finds the max's frame by comparing
    # values, and under jit XLA recomputes them in the backward pass with other rounding, so
    # that for some (video, unit) no frame matched and the gradient was lost.
    at_Bx1xH = jnp.argmax(h_BxTxH, axis=1)[:, None, :]
    return jnp.take_along_axis(h_BxTxH, at_Bx1xH, axis=1)[:, 0].astype(jnp.float32)


class NetVLAD(nn.Module):
  """NetVLAD (paper, eqs. 4-5): soft-assigned residuals to K learnt centres, normalized.

  By default the per-frame part runs with a hand-written gradient whose products are written in
  their fast orientation (mfb_jax/netvlad_pool.py: autodiff's arithmetic, NetVLAD+MFB steps
  +9.5% on a CPU); `hand_written_gradient=False` lets JAX differentiate the same forward.
  """

  num_clusters: int = 8
  hand_written_gradient: bool = True
  # Matmul dtype (per-frame products: never narrower than the frames); softmax and
  # normalizations run in float32.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    B, T, F = x_BxTxF.shape
    K = self.num_clusters
    init = nn.initializers.normal(stddev=F**-0.5)
    kernel_FxK, bias_K = _DenseVariables((F, K), kernel_init=init, name="assign")()
    sums = netvlad_pool.soft_assignment_sums
    if not self.hand_written_gradient:
      sums = netvlad_pool.autodiff_sums
    # The per-frame products have K columns: they are bound by reading the frames, so a narrower
    # matmul dtype gains nothing unless the frames already come in it (as the input pipeline
    # delivers them for a bfloat16 model), and narrowing float32 frames here would cost a pass
    # over them (about 24 thread-ms per bf16 NetVLAD+MFB step on a Zen 4). So: never narrower
    # than the frames.
    x_BxTxF = jnp.asarray(x_BxTxF)  # A float64 numpy input becomes float32 here (no x64).
    frames_dtype = jnp.promote_types(x_BxTxF.dtype, self.dtype)
    # Soft assignment with bias; padded frames get zero weight, so they add no residual.
    weighted_BxKxF, mass_BxK = sums(
      x_BxTxF.astype(frames_dtype),
      mask_BxT.astype(jnp.float32),
      kernel_FxK,  # Cast to the frames' dtype inside, where its gradient stays float32.
      bias_K,
    )
    centres_KxF = self.param("centres", init, (K, F))
    # sum_t a_tk (x_t - c_k) = sum_t a_tk x_t - (sum_t a_tk) c_k.
    vlad_BxKxF = weighted_BxKxF - mass_BxK[:, :, None] * centres_KxF[None]
    vlad_BxKxF = l2_normalize(vlad_BxKxF, axis=-1)  # Intra-normalization, per cluster.
    return l2_normalize(vlad_BxKxF.reshape(B, K * F), axis=-1)
