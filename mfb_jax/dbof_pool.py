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
   It computes the extremes a few frames at a time (`lax.scan` over frame chunks), so h is
   never written to memory. The moments come from the Gram matrix G = X^T M X (F x F), summed
   over the same chunks while they are in cache: sum_n m_n h_n = (sum_n m_n x_n) W and
   sum_n m_n h_nc^2 = w_c^T G w_c, so nothing sums over h.
2. The gradient reaching h is sparse plus affine: the frame t*_bc of each (video, channel) gets
   the max's gradient g_bc, and every valid frame n gets a_c + b_c h_nc through the batch
   moments. So
     dW = sum_b x[b, t*_bc] g_bc + (sum_n m_n x_n) a^T + (X^T M X) W diag(b),
   a gather plus G W, which the forward has computed already (G: half the FLOPs of x^T dh for
   F = 1024 < H).

In bfloat16 every product over the frames is in the form XLA:CPU runs natively (bf16 x bf16 ->
float32; the chunk's Gram from a small transposed copy). Computing G per chunk in the forward,
instead of as one product over all frames in the backward, took the bf16 DBoF+MFB step from
1101.5 to 697.7 ms on a 2-core Xeon with AMX (XLA had widened that one product, 80 GFLOP, to
float32), and the float32 step from 1823 to 1701 ms (interleaved in one process; sixth session).

On ties (two frames with the same extreme value) the gradient goes to the first frame, where
JAX's max would split it; the forward value is the same. The input's gradient dx (needed only
when the frames are learnt, as in frame-level fusion) recomputes h densely; XLA drops it from the
compiled step when nothing uses it. Tested against autodiff of the plain formula.

Shapes: B batch, T frames, F input features, H hidden units.
"""

import functools

import jax
import jax.numpy as jnp

from mfb_jax.pooling_common import (
  accumulation_dtype,
  replicated_under_explicit_sharding,
  transposed_copy,
)

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


def extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H, with_gram: bool = False):
  """Per video and channel the extreme of h over valid frames (the max where scale >= 0, the
  min elsewhere: identity 1) and its first frame t*; with_gram: also the Gram matrix X^T M X
  [F, F] (float32) of the valid frames. h = x W is built a few frames at a time, and the Gram
  matrix is summed over the same chunks while they are in cache."""
  sign_H = jnp.where(scale_H >= 0, 1.0, -1.0)
  B, T, F = x_BxTxF.shape
  H = kernel_FxH.shape[1]
  chunk = next(c for c in (_FRAMES_PER_CHUNK, 3, 2, 1) if T % c == 0)
  x_CxBxcxF = x_BxTxF.reshape(B, T // chunk, chunk, F).transpose(1, 0, 2, 3)
  mask_CxBxc = mask_BxT.reshape(B, T // chunk, chunk).transpose(1, 0, 2)
  frame_c = jnp.arange(chunk, dtype=jnp.int32)[None, :, None]
  acc = accumulation_dtype(x_BxTxF, kernel_FxH)

  def step(carry, inputs):
    best_BxH, t_star_BxH, gram_FxF = carry
    x_Bxc_F, mask_Bxc, first = inputs
    h_BxcxH = hidden(x_Bxc_F, kernel_FxH)
    m_Bxcx1 = mask_Bxc[:, :, None]
    signed = jnp.where(m_Bxcx1 > 0, h_BxcxH * sign_H[None, None], -jnp.inf)
    chunk_best_BxH = jnp.max(signed, axis=1)
    at_best = signed == chunk_best_BxH[:, None, :]
    chunk_t_BxH = jnp.min(jnp.where(at_best, frame_c, chunk), axis=1) + first
    better = chunk_best_BxH > best_BxH  # Strict: ties keep the earlier frame.
    if with_gram:
      gram_FxF = gram_FxF + _gram(x_Bxc_F * m_Bxcx1.astype(x_Bxc_F.dtype), x_Bxc_F, acc)
    return (
      jnp.where(better, chunk_best_BxH, best_BxH),
      jnp.where(better, chunk_t_BxH, t_star_BxH),
      gram_FxF,
    ), None

  init = (
    jnp.full((B, H), -jnp.inf, acc),
    jnp.zeros((B, H), jnp.int32),
    jnp.zeros((F, F) if with_gram else (), acc),
  )
  firsts = jnp.arange(0, T, chunk, dtype=jnp.int32)
  (best_BxH, t_star_BxH, gram_FxF), _ = jax.lax.scan(step, init, (x_CxBxcxF, mask_CxBxc, firsts))
  return best_BxH * sign_H[None], t_star_BxH, gram_FxF


def _gram(valid_BxcxF, x_BxcxF, acc):
  """sum over the chunk's rows of valid^T x, [F, F]: in bfloat16 from a transposed copy of the
  valid rows, the form XLA:CPU runs natively (else it widens the whole product to float32)."""
  F = x_BxcxF.shape[-1]
  valid_NxF, rows_NxF = valid_BxcxF.reshape(-1, F), x_BxcxF.reshape(-1, F)
  lhs, dims = valid_NxF, (((0,), (0,)), ((), ()))
  if jnp.finfo(x_BxcxF.dtype).bits < 32:
    lhs, dims = transposed_copy(valid_NxF, (1, 0)), (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(
    lhs,
    rows_NxF,
    dims,
    preferred_element_type=acc,
    out_sharding=replicated_under_explicit_sharding(rows_NxF),
  )


def moments(x_BxTxF, mask_BxT, kernel_FxH, gram_FxF):
  """(sum_x [F], G W [F, H], sum(m h) [H], sum(m h^2) [H]), float32, from the Gram matrix G:
  sum_n m_n h_n = (sum_n m_n x_n) W and sum_n m_n h_nc^2 = w_c^T G w_c, so the scan never sums
  over h (two reductions of every chunk of h: about 7% of a bf16 DBoF+MFB step)."""
  acc = gram_FxF.dtype
  B, T, F = x_BxTxF.shape
  valid_NxF = (x_BxTxF * mask_BxT[:, :, None].astype(x_BxTxF.dtype)).reshape(B * T, F)
  sum_x_F = jnp.sum(valid_NxF, axis=0, dtype=acc)
  kernel_FxH = kernel_FxH.astype(acc)
  gram_kernel_FxH = jnp.dot(gram_FxF, kernel_FxH, preferred_element_type=acc)
  sum_H = jnp.dot(sum_x_F, kernel_FxH, preferred_element_type=acc)
  sum_sq_H = jnp.sum(gram_kernel_FxH * kernel_FxH, axis=0)
  return sum_x_F, gram_kernel_FxH, sum_H, sum_sq_H


def _pool(hsel_BxH, has_frames_Bx1, mean_H, var_H, scale_H, bias_H, epsilon):
  """relu(s (hsel - mean) + bias), 0 for a video without valid frames (identity 1)."""
  s_H = scale_H * jax.lax.rsqrt(var_H + epsilon)
  hsel_BxH = jnp.where(has_frames_Bx1, hsel_BxH, mean_H[None])  # No inf into the arithmetic.
  pre_BxH = s_H[None] * (hsel_BxH - mean_H[None]) + bias_H[None]
  return jnp.where(has_frames_Bx1, jax.nn.relu(pre_BxH), 0.0), hsel_BxH, pre_BxH


def eval_pool(x_BxTxF, mask_BxT, kernel_FxH, mean_H, var_H, scale_H, bias_H, epsilon):
  """max_t relu(BN(x W)) with the given (running) mean and variance."""
  hsel_BxH, _, _ = extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H)
  return _pool(hsel_BxH, _has_frames(mask_BxT), mean_H, var_H, scale_H, bias_H, epsilon)[0]


def _forward(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon):
  hsel_BxH, t_star_BxH, gram_FxF = extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H, True)
  sum_x_F, gram_kernel_FxH, sum_H, sum_sq_H = moments(x_BxTxF, mask_BxT, kernel_FxH, gram_FxF)
  count = jnp.maximum(jnp.sum(mask_BxT), 1.0)
  mean_H = sum_H / count
  var_H = jnp.maximum(sum_sq_H / count - jnp.square(mean_H), 0.0)  # Biased, as flax.
  pooled_BxH, hsel_BxH, pre_BxH = _pool(
    hsel_BxH, _has_frames(mask_BxT), mean_H, var_H, scale_H, bias_H, epsilon
  )
  saved = (x_BxTxF, mask_BxT, kernel_FxH, scale_H, mean_H, var_H, hsel_BxH, pre_BxH, t_star_BxH)
  return (pooled_BxH, mean_H, var_H), (*saved, sum_x_F, gram_kernel_FxH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def train_pool(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon):
  """(pooled [B, H], batch mean [H], batch variance [H]) of max_t relu(BN_batch(x W)).

  Only `pooled` carries gradients; the moments are for the running averages.
  """
  return _forward(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon)[0]


def _train_pool_bwd(epsilon, saved, cotangents):
  x, mask_BxT, kernel_FxH, scale_H, mean_H, var_H, hsel_BxH, pre_BxH, t_star_BxH = saved[:9]
  sum_x_F, gram_kernel_FxH = saved[9:]  # sum_n m_n x_n and (X^T M X) W, from the forward.
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
  d_kernel = sparse_HxF.T + sum_x_F[:, None] * a_H[None] + gram_kernel_FxH * b_H[None]

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
