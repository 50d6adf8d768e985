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

In bfloat16 every product of the forward and of the kernel's gradient is in the form XLA:CPU
runs natively (bf16 x bf16 -> float32; the chunk's Gram from a small transposed copy); the
kernel is cast inside, so a float32 kernel gets a float32 gradient. On a sharded batch each
device sums the Gram matrix of its own videos, reduced once after the scan. Computing G per
chunk in the forward, instead of as one product over all frames in the backward, took the bf16
DBoF+MFB step from 1101.5 to 697.7 ms on a 2-core Xeon with AMX (XLA had widened that one
product, 80 GFLOP, to float32), and the float32 step from 1823 to 1701 ms (interleaved in one
process; sixth session).

On ties (two frames with the same extreme value) the gradient goes to the first frame, where
JAX's max would split it; the forward value is the same. The input's gradient dx (needed only
when the frames are learnt, as in frame-level fusion) recomputes h densely; XLA drops it from the
compiled step when nothing uses it. Tested against autodiff of the plain formula.

Shapes: B batch, T frames, F input features, H hidden units.
"""

import functools

import jax
import jax.numpy as jnp

from mfb_jax.pooling_common import accumulation_dtype, batch_sharded, sum_over_rows

# Frames per scan step: enough rows (B x 4) for an efficient matmul, few enough that the
# chunk's h stays in cache. Other frame counts are padded up with masked frames.
_FRAMES_PER_CHUNK = 4


def hidden(x_BxTxF: jax.Array, kernel_FxH: jax.Array) -> jax.Array:
  """h = x W as one 2-D (B*T, F) x (F, H) matmul (faster on CPU than a 3-D dot), float32."""
  B, T, F = x_BxTxF.shape
  acc = accumulation_dtype(x_BxTxF, kernel_FxH)
  h_NxH = jnp.dot(x_BxTxF.reshape(B * T, F), kernel_FxH, preferred_element_type=acc)
  return h_NxH.reshape(B, T, -1)


def _has_frames(mask_BxT: jax.Array) -> jax.Array:
  return jnp.any(mask_BxT > 0, axis=1, keepdims=True)


def _batch_groups(batch_size: int) -> int:
  """Parts of the batch whose Gram matrices the scan sums apart: one per device, as the
  trainer's mesh (train.make_mesh) shards the batch over all devices. Summed over a sharded
  batch inside the scan, one Gram matrix would cost an all-reduce per chunk (75 of 4 MB a
  step); apart, each device sums its own and they are reduced once, after the scan."""
  devices = jax.device_count()
  return devices if batch_size % devices == 0 else 1


def extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H, with_moments: bool = False):
  """(hsel, t*, G, sum_x): per video and channel the extreme of h = x W over valid frames (the
  max where scale >= 0, the min elsewhere: identity 1) and its first frame t*; with_moments:
  also the Gram matrix G = X^T M X [F, F] and sum_n m_n x_n [F] of the valid frames (float32,
  else None). h is built a few frames at a time, and G and sum_x are summed over the same chunks
  while they are in cache. The kernel is used in the frames' dtype."""
  sign_H = jnp.where(scale_H >= 0, 1.0, -1.0)
  kernel_FxH = kernel_FxH.astype(x_BxTxF.dtype)
  B, T, F = x_BxTxF.shape
  H = kernel_FxH.shape[1]
  pad = -T % _FRAMES_PER_CHUNK  # Padded frames are masked: never an extreme, not in G.
  if pad:
    x_BxTxF = jnp.pad(x_BxTxF, ((0, 0), (0, pad), (0, 0)))
    mask_BxT = jnp.pad(mask_BxT, ((0, 0), (0, pad)))
  chunk, num_chunks = _FRAMES_PER_CHUNK, (T + pad) // _FRAMES_PER_CHUNK
  x_CxBxcxF = x_BxTxF.reshape(B, num_chunks, chunk, F).transpose(1, 0, 2, 3)
  mask_CxBxc = mask_BxT.reshape(B, num_chunks, chunk).transpose(1, 0, 2)
  frame_c = jnp.arange(chunk, dtype=jnp.int32)[None, :, None]
  acc = accumulation_dtype(x_BxTxF, kernel_FxH)
  D = _batch_groups(B)

  def step(carry, inputs):
    best_BxH, t_star_BxH, gram_DxFxF, sum_x_DxF = carry
    x_Bxc_F, mask_Bxc, first = inputs
    h_BxcxH = hidden(x_Bxc_F, kernel_FxH)
    m_Bxcx1 = mask_Bxc[:, :, None]
    signed = jnp.where(m_Bxcx1 > 0, h_BxcxH * sign_H[None, None], -jnp.inf)
    chunk_best_BxH = jnp.max(signed, axis=1)
    at_best = signed == chunk_best_BxH[:, None, :]
    chunk_t_BxH = jnp.min(jnp.where(at_best, frame_c, chunk), axis=1) + first
    better = chunk_best_BxH > best_BxH  # Strict: ties keep the earlier frame.
    if with_moments:
      valid_BxcxF = x_Bxc_F * m_Bxcx1.astype(x_Bxc_F.dtype)
      gram, sum_x = _chunk_moments(valid_BxcxF, x_Bxc_F, D, acc)
      gram_DxFxF, sum_x_DxF = gram_DxFxF + gram, sum_x_DxF + sum_x
    return (
      jnp.where(better, chunk_best_BxH, best_BxH),
      jnp.where(better, chunk_t_BxH, t_star_BxH),
      gram_DxFxF,
      sum_x_DxF,
    ), None

  # On a mesh with Explicit axes the carry is split as the scan's outputs are: by the batch.
  rows = batch_sharded(mask_BxT)
  groups = rows if with_moments and D > 1 else None
  init = (
    jnp.full((B, H), -jnp.inf, acc, out_sharding=rows),
    jnp.zeros((B, H), jnp.int32, out_sharding=rows),
    jnp.zeros((D, F, F) if with_moments else (), acc, out_sharding=groups),
    jnp.zeros((D, F) if with_moments else (), acc, out_sharding=groups),
  )
  firsts = jnp.arange(0, T + pad, chunk, dtype=jnp.int32)
  (best_BxH, t_star_BxH, gram_DxFxF, sum_x_DxF), _ = jax.lax.scan(
    step, init, (x_CxBxcxF, mask_CxBxc, firsts)
  )
  if not with_moments:
    return best_BxH * sign_H[None], t_star_BxH, None, None
  return best_BxH * sign_H[None], t_star_BxH, jnp.sum(gram_DxFxF, 0), jnp.sum(sum_x_DxF, 0)


def _chunk_moments(valid_BxcxF, x_BxcxF, D, acc):
  """(valid^T x [D, F, F], sum of valid [D, F]) of one chunk, per group of videos."""
  B, c, F = x_BxcxF.shape
  if D == 1:  # 2-D rows: the fastest float32 form (a grouped one adds a transposed copy).
    gram_FxF = sum_over_rows(valid_BxcxF.reshape(B * c, F), x_BxcxF.reshape(B * c, F), acc)
    return gram_FxF[None], jnp.sum(valid_BxcxF, axis=(0, 1), dtype=acc)[None]
  groups = (D, B // D, c, F)  # Splits only the batch axis (explicit sharding allows it).
  valid_DxbxcxF = valid_BxcxF.reshape(groups)
  gram_DxFxF = sum_over_rows(valid_DxbxcxF, x_BxcxF.reshape(groups), acc, groups=1)
  return gram_DxFxF, jnp.sum(valid_DxbxcxF, axis=(1, 2), dtype=acc)


def moments(kernel_FxH, gram_FxF, sum_x_F):
  """(G W [F, H], sum(m h) [H], sum(m h^2) [H]), float32, from the Gram matrix G and
  sum_x = sum_n m_n x_n: sum_n m_n h_n = sum_x W and sum_n m_n h_nc^2 = w_c^T G w_c, so the scan
  never sums over h (two reductions of every chunk of h: about 7% of a bf16 DBoF+MFB step).
  kernel: in the frames' dtype, as the forward used it."""
  acc = gram_FxF.dtype
  kernel_FxH = kernel_FxH.astype(acc)
  gram_kernel_FxH = jnp.dot(gram_FxF, kernel_FxH, preferred_element_type=acc)
  sum_H = jnp.dot(sum_x_F, kernel_FxH, preferred_element_type=acc)
  sum_sq_H = jnp.sum(gram_kernel_FxH * kernel_FxH, axis=0)
  return gram_kernel_FxH, sum_H, sum_sq_H


def _pool(hsel_BxH, has_frames_Bx1, mean_H, var_H, scale_H, bias_H, epsilon):
  """relu(s (hsel - mean) + bias), 0 for a video without valid frames (identity 1)."""
  s_H = scale_H * jax.lax.rsqrt(var_H + epsilon)
  hsel_BxH = jnp.where(has_frames_Bx1, hsel_BxH, mean_H[None])  # No inf into the arithmetic.
  pre_BxH = s_H[None] * (hsel_BxH - mean_H[None]) + bias_H[None]
  return jnp.where(has_frames_Bx1, jax.nn.relu(pre_BxH), 0.0), hsel_BxH, pre_BxH


def eval_pool(x_BxTxF, mask_BxT, kernel_FxH, mean_H, var_H, scale_H, bias_H, epsilon):
  """max_t relu(BN(x W)) with the given (running) mean and variance; x W in x's dtype."""
  hsel_BxH, _, _, _ = extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H)
  return _pool(hsel_BxH, _has_frames(mask_BxT), mean_H, var_H, scale_H, bias_H, epsilon)[0]


def _forward(x_BxTxF, mask_BxT, kernel_FxH, scale_H, bias_H, epsilon):
  hsel_BxH, t_star_BxH, gram_FxF, sum_x_F = extremes(x_BxTxF, mask_BxT, kernel_FxH, scale_H, True)
  narrow_kernel_FxH = kernel_FxH.astype(x_BxTxF.dtype)
  gram_kernel_FxH, sum_H, sum_sq_H = moments(narrow_kernel_FxH, gram_FxF, sum_x_F)
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

  Only `pooled` carries gradients; the moments are for the running averages. x W runs in x's
  dtype (the kernel is cast inside, so a float32 kernel gets its gradient in float32).
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

  T = x.shape[1]
  narrow_kernel_FxH = kernel_FxH.astype(x.dtype)  # The forward's kernel.
  acc = accumulation_dtype(x, narrow_kernel_FxH)
  m_BxTx1 = mask_BxT[:, :, None].astype(x.dtype)
  gather = lambda x_TxF, t_H, d_H: x_TxF[t_H].astype(acc) * d_H[:, None]
  sparse_HxF = jnp.sum(jax.vmap(gather)(x, t_star_BxH, d_hsel_BxH), axis=0)
  d_kernel = sparse_HxF.T + sum_x_F[:, None] * a_H[None] + gram_kernel_FxH * b_H[None]

  # dx, dense: recomputes h; compiled away when x is data.
  h_BxTxH = hidden(x, narrow_kernel_FxH)
  onehot_BxTxH = jnp.arange(T)[None, :, None] == t_star_BxH[:, None, :]
  dh_BxTxH = jnp.where(onehot_BxTxH, d_hsel_BxH[:, None, :], 0.0) + m_BxTx1 * (
    a_H[None, None] + b_H[None, None] * h_BxTxH
  )
  d_x = jnp.einsum("bth,fh->btf", dh_BxTxH, narrow_kernel_FxH.astype(acc)).astype(x.dtype)
  d_kernel = d_kernel.astype(kernel_FxH.dtype)
  return d_x, jnp.zeros_like(mask_BxT), d_kernel, d_scale, d_bias


train_pool.defvjp(_forward, _train_pool_bwd)
