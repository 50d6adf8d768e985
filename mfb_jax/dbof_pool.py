"""DBoF's fc -> BatchNorm -> ReLU -> max over frames, fused, with a hand-written gradient.

The fc output h = x W of DBoF has one row per frame (B*T = 38,400 rows of 2000 for the paper's
setup, 307 MB). By autodiff, `max_t relu(BN(x W))` costs a second full matmul in the backward
(dW = x^T dh, as many FLOPs as the forward) and a dozen elementwise passes over h. Two exact
identities avoid both:

1. BatchNorm then ReLU is monotone per channel c: with s_c = scale_c / sqrt(var_c + eps),
     max_t relu(s_c (h_tc - mean_c) + bias_c) = relu(s_c (hsel_c - mean_c) + bias_c),
   where hsel is the max over valid frames of h if scale_c >= 0 and the min if scale_c < 0 (the
   sign of s is the sign of scale). So the forward needs, per video and channel, only the
   extreme value and its frame t*, and per channel sum(h) and sum(h^2) for the batch moments.
   It computes them a few frames at a time (`lax.scan` over frame chunks), so h is never
   written to memory: the forward costs what the fc matmul alone costs.
2. The gradient reaching h is sparse plus affine: the frame t*_bc of each (video, channel) gets
   the max's gradient g_bc, and every valid frame n gets a_c + b_c h_nc through the batch
   moments. So
     dW = sum_b x[b, t*_bc] g_bc + (sum_n m_n x_n) a^T + (X^T M X) W diag(b),
   a gather plus the Gram matrix X^T M X (F x F: half the FLOPs of x^T dh for F = 1024 < H).

On ties (two frames with the same extreme value) the gradient goes to the first frame, where
JAX's max would split it; the forward value is the same. The input's gradient dx (needed only
when the frames are learnt, as in frame-level fusion) recomputes h densely; XLA drops it from the
compiled step when nothing uses it. Tested against autodiff of the plain formula.

Shapes: B batch, T frames, F input features, H hidden units.
"""

import functools

import jax
import jax.numpy as jnp

from mfb_jax.pooling_common import accumulation_dtype, replicated_under_explicit_sharding

# Frames per scan step: enough rows (B x 4) for an efficient matmul, few enough that the
# chunk's h stays in cache.
_FRAMES_PER_CHUNK = 4


def hidden(x_BxTxF: jax.Array, kernel_FxH: jax.Array) -> jax.Array:
  """h = x W as one 2-D (B*T, F) x (F, H) matmul (faster on CPU than a 3-D dot), float32."""
  B, T, F = x_BxTxF.shape
  acc = accumulation_dtype(x_BxTxF, kernel_FxH)
  h_NxH = jnp.dot(x_BxTxF.reshape(B * T, F), kernel_FxH, preferred_element_type=acc)
  return h_NxH.reshape(B, T, -1)


def _has_frames(mask_BxT: jax.Array) -> jax.Array:
  return jnp.any(mask_BxT > 0, axis=1, keepdims=True)


def extremes_and_sums(x_BxTxF, mask_BxT, kernel_FxH, scale_H):
  """Per video and channel the extreme of h over valid frames (the max where scale >= 0, the
  min elsewhere: identity 1) and its first frame t*; per channel sum(m h) and sum(m h^2).
  h = x W is built a few frames at a time."""
  sign_H = jnp.where(scale_H >= 0, 1.0, -1.0)
  B, T, F = x_BxTxF.shape
  H = kernel_FxH.shape[1]
  chunk = next(c for c in (_FRAMES_PER_CHUNK, 3, 2, 1) if T % c == 0)
  x_CxBxcxF = x_BxTxF.reshape(B, T // chunk, chunk, F).transpose(1, 0, 2, 3)
  mask_CxBxc = mask_BxT.reshape(B, T // chunk, chunk).transpose(1, 0, 2)
  frame_c = jnp.arange(chunk, dtype=jnp.int32)[None, :, None]

  def step(carry, inputs):
    best_BxH, t_star_BxH, sum_H, sum_sq_H = carry
    x_Bxc_F, mask_Bxc, first = inputs
    h_BxcxH = hidden(x_Bxc_F, kernel_FxH)
    m_Bxcx1 = mask_Bxc[:, :, None]
    signed = jnp.where(m_Bxcx1 > 0, h_BxcxH * sign_H[None, None], -jnp.inf)
    chunk_best_BxH = jnp.max(signed, axis=1)
    at_best = signed == chunk_best_BxH[:, None, :]
    chunk_t_BxH = jnp.min(jnp.where(at_best, frame_c, chunk), axis=1) + first
    better = chunk_best_BxH > best_BxH  # Strict: ties keep the earlier frame.
    return (
      jnp.where(better, chunk_best_BxH, best_BxH),
      jnp.where(better, chunk_t_BxH, t_star_BxH),
      sum_H + jnp.sum(h_BxcxH * m_Bxcx1, axis=(0, 1)),
      sum_sq_H + jnp.sum(jnp.square(h_BxcxH) * m_Bxcx1, axis=(0, 1)),
    ), None

  acc = accumulation_dtype(x_BxTxF, kernel_FxH)
  init = (
    jnp.full((B, H), -jnp.inf, acc),
    jnp.zeros((B, H), jnp.int32),
    jnp.zeros((H,), acc),
    jnp.zeros((H,), acc),
  )
  firsts = jnp.arange(0, T, chunk, dtype=jnp.int32)
  (best_BxH, t_star_BxH, sum_H, sum_sq_H), _ = jax.lax.scan(
    step, init, (x_CxBxcxF, mask_CxBxc, firsts)
  )
  return best_BxH * sign_H[None], t_star_BxH, sum_H, sum_sq_H


def _pool(hsel_BxH, has_frames_Bx1, mean_H, var_H, scale_H, bias_H, epsilon):
  """relu(s (hsel - mean) + bias), 0 for a video without valid frames (identity 1)."""
  s_H = scale_H * jax.lax.rsqrt(var_H + epsilon)
  hsel_BxH = jnp.where(has_frames_Bx1, hsel_BxH, mean_H[None])  # No inf into the arithmetic.
  pre_BxH = s_H[None] * (hsel_BxH - mean_H[None]) + bias_H[None]
  return jnp.where(has_frames_Bx1, jax.nn.relu(pre_BxH), 0.0), hsel_BxH, pre_BxH


def eval_pool(x_BxTxF, mask_BxT, kernel_FxH, mean_H, var_H, scale_H, bias_H, epsilon):
  """max_t relu(BN(x W)) with the given (running) mean and variance."""
  hsel_BxH, _, _, _ = extremes_and_sums(x_BxTxF, mask_BxT, kernel_FxH, scale_H)
  return _pool(hsel_BxH, _has_frames(mask_BxT), mean_H, var_H, scale_H, bias_H, epsilon)[0]


def _forward(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon):
  hsel_BxH, t_star_BxH, sum_H, sum_sq_H = extremes_and_sums(x_BxTxF, mask_BxT, kernel_FxH, scale_H)
  count = jnp.maximum(jnp.sum(mask_BxT), 1.0)
  mean_H = sum_H / count
  var_H = jnp.maximum(sum_sq_H / count - jnp.square(mean_H), 0.0)  # Biased, as flax.
  pooled_BxH, hsel_BxH, pre_BxH = _pool(
    hsel_BxH, _has_frames(mask_BxT), mean_H, var_H, scale_H, bias_H, epsilon
  )
  saved = (x_BxTxF, mask_BxT, kernel_FxH, scale_H, mean_H, var_H, hsel_BxH, pre_BxH, t_star_BxH)
  return (pooled_BxH, mean_H, var_H), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def train_pool(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon):
  """(pooled [B, H], batch mean [H], batch variance [H]) of max_t relu(BN_batch(x W)).

  Only `pooled` carries gradients; the moments are for the running averages.
  """
  return _forward(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon)[0]


def _train_pool_bwd(epsilon, saved, cotangents):
  x, mask_BxT, kernel_FxH, scale_H, mean_H, var_H, hsel_BxH, pre_BxH, t_star_BxH = saved
  g_BxH = jnp.where((pre_BxH > 0) & _has_frames(mask_BxT), cotangents[0], 0.0)  # The ReLU.
  count = jnp.maximum(jnp.sum(mask_BxT), 1.0)
  inv_std_H = jax.lax.rsqrt(var_H + epsilon)
  d_bias = jnp.sum(g_BxH, axis=0)
  d_s = jnp.sum(g_BxH * (hsel_BxH - mean_H[None]), axis=0)
  d_scale = d_s * inv_std_H
  d_hsel_BxH = g_BxH * (scale_H * inv_std_H)[None]
  d_var = d_s * scale_H * -0.5 * inv_std_H**3
  d_mean = -jnp.sum(d_hsel_BxH, axis=0)
  # dh_n = [sparse] + m_n (a + b h_n), from mean = sum(m h)/N and var = sum(m h^2)/N - mean^2.
  a_H = (d_mean - 2.0 * d_var * mean_H) / count
  b_H = 2.0 * d_var / count

  B, T, F = x.shape
  acc = accumulation_dtype(x, kernel_FxH)
  m_BxTx1 = mask_BxT[:, :, None].astype(x.dtype)
  gather = lambda x_TxF, t_H, d_H: x_TxF[t_H].astype(acc) * d_H[:, None]
  sparse_HxF = jnp.sum(jax.vmap(gather)(x, t_star_BxH, d_hsel_BxH), axis=0)
  valid_rows_NxF = (x * m_BxTx1).reshape(B * T, F)
  sum_x_F = jnp.sum(valid_rows_NxF, axis=0, dtype=acc)
  rows_NxF = x.reshape(B * T, F)
  gram_FxF = jax.lax.dot_general(
    valid_rows_NxF,
    rows_NxF,
    (((0,), (0,)), ((), ())),
    preferred_element_type=acc,
    out_sharding=replicated_under_explicit_sharding(rows_NxF),
  )
  gram_term_FxH = jnp.dot(gram_FxF, kernel_FxH, preferred_element_type=acc)
  d_kernel = sparse_HxF.T + sum_x_F[:, None] * a_H[None] + gram_term_FxH * b_H[None]

  # dx, dense: recomputes h; compiled away when x is data.
  h_BxTxH = hidden(x, kernel_FxH)
  onehot_BxTxH = jnp.arange(T)[None, :, None] == t_star_BxH[:, None, :]
  dh_BxTxH = jnp.where(onehot_BxTxH, d_hsel_BxH[:, None, :], 0.0) + m_BxTx1 * (
    a_H[None, None] + b_H[None, None] * h_BxTxH
  )
  d_x = jnp.einsum("bth,fh->btf", dh_BxTxH, kernel_FxH.astype(acc)).astype(x.dtype)
  d_kernel = d_kernel.astype(kernel_FxH.dtype)
  return d_x, jnp.zeros_like(mask_BxT), d_kernel, d_scale, d_bias


train_pool.defvjp(_forward, _train_pool_bwd)
