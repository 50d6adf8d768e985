"""NetVLAD's soft-assignment sums with a hand-written gradient in the fast product orientations.

The part of NetVLAD (paper, eq. 4) that touches every frame is, per video b and cluster k,
    a_btk = m_bt softmax_k(x_bt W + c)_k,   S_bkf = sum_t a_btk x_btf,   M_bk = sum_t a_btk,
with m the frame mask. Its gradient is four products over the frame tensor x (B*T rows of F),
each with only K (8) columns on the other side: skinny products, whose speed on a CPU depends on
which way round they are written, by up to 3x for the same FLOPs. Autodiff writes the kernel's
gradient as x^T g ([F, N] x [N, K]): 47 ms for the paper's rgb shapes (128 x 300 frames of 1024)
on a 2-core Xeon, where (g^T x)^T takes 15-17 ms. The backward here writes every product in its
fast orientation (see BENCHMARKS.md); the arithmetic is autodiff's (`autodiff_sums`: the
same forward, differentiated by JAX; outputs bit-identical, gradients within rounding). With
bfloat16 inputs the products run in bfloat16 with float32 accumulation and the bias is added to
the float32 logits; the sums and the kernel's gradient then take the forms XLA:CPU runs natively
in bfloat16 (a small transposed copy of the assignments or of g first): bfloat16 frames, as the
input pipeline delivers them to a bfloat16 model, are never widened to float32 (with the
pipeline's bfloat16 frames, the bfloat16 NetVLAD+MFB step took 4-7% less time on a 2-core Xeon
with AMX: 286.2 -> 274.6 and 233.8 -> 218.1 ms in two interleaved runs; sixth session).

The gradient of x (needed only when the frames are computed, as in frame-level fusion) is
returned too; XLA drops it from the compiled step when x is data. Tested against autodiff of the
plain formula.

Shapes: B batch, T frames, F input features, K clusters, N = B*T.
"""

import jax
import jax.numpy as jnp

from mfb_jax.pooling_common import accumulation_dtype, is_narrow, sum_over_rows, transposed_copy


def _probabilities(x_BxTxF, kernel_FxK, bias_K):
  """softmax(x W + c) per frame, in float32 (or wider), shape [B, T, K]."""
  B, T, F = x_BxTxF.shape
  acc = accumulation_dtype(x_BxTxF, kernel_FxK)
  logits_NxK = jnp.dot(x_BxTxF.reshape(B * T, F), kernel_FxK, preferred_element_type=acc)
  logits_NxK = logits_NxK + bias_K.astype(acc)[None]
  return jax.nn.softmax(logits_NxK, axis=-1).reshape(B, T, -1)


def _forward(x_BxTxF, mask_BxT, kernel_FxK, bias_K):
  # The kernel is cast to the frames' dtype here, inside the custom gradient, so that a float32
  # kernel gets its gradient in float32 (a cast outside would round it to bfloat16).
  acc = accumulation_dtype(x_BxTxF, kernel_FxK)
  probs_BxTxK = _probabilities(x_BxTxF, kernel_FxK.astype(x_BxTxF.dtype), bias_K)
  assign_BxTxK = probs_BxTxK * mask_BxT[:, :, None].astype(acc)  # Padded frames: no weight.
  if is_narrow(x_BxTxF.dtype):  # [B, K, T] x [B, T, F]: the form XLA:CPU runs natively in bfloat16.
    assign_BxKxT = transposed_copy(assign_BxTxK.astype(x_BxTxF.dtype), (0, 2, 1), pad_axis=1)
    dims = (((2,), (1,)), ((0,), (0,)))
    weighted_BxKxF = jax.lax.dot_general(assign_BxKxT, x_BxTxF, dims, preferred_element_type=acc)
  else:
    weighted_BxKxF = jnp.einsum(
      "btk,btf->bkf", assign_BxTxK.astype(x_BxTxF.dtype), x_BxTxF, preferred_element_type=acc
    )
  mass_BxK = jnp.sum(assign_BxTxK, axis=1)
  return (weighted_BxKxF, mass_BxK), (x_BxTxF, mask_BxT, kernel_FxK, bias_K, probs_BxTxK)


def autodiff_sums(x_BxTxF, mask_BxT, kernel_FxK, bias_K):
  """soft_assignment_sums without the hand-written gradient (JAX differentiates the forward;
  forward-mode autodiff works too)."""
  return _forward(x_BxTxF, mask_BxT, kernel_FxK, bias_K)[0]


@jax.custom_vjp
def soft_assignment_sums(x_BxTxF, mask_BxT, kernel_FxK, bias_K):
  """(S [B, K, F], M [B, K]): the assignment-weighted frame sums and the assignment masses.

  float32 results (or wider) for any input dtype; bfloat16 frames give bfloat16 products with
  float32 accumulation (the kernel is cast to the frames' dtype; its gradient keeps the
  kernel's own dtype).
  """
  return _forward(x_BxTxF, mask_BxT, kernel_FxK, bias_K)[0]


def _backward(saved, cotangents):
  x_BxTxF, mask_BxT, kernel_FxK, bias_K, probs_BxTxK = saved
  g_weighted_BxKxF, g_mass_BxK = cotangents
  B, T, F = x_BxTxF.shape
  acc = probs_BxTxK.dtype
  # dL/da_btk = <dS_bk, x_bt> + dM_bk, then the mask, then the softmax's Jacobian.
  g_assign_BxTxK = jnp.einsum(
    "bkf,btf->btk",
    g_weighted_BxKxF.astype(x_BxTxF.dtype),
    x_BxTxF,
    preferred_element_type=acc,
  )
  g_assign_BxTxK = g_assign_BxTxK + g_mass_BxK[:, None, :].astype(acc)
  m_BxTx1 = mask_BxT[:, :, None].astype(acc)
  g_probs_BxTxK = g_assign_BxTxK * m_BxTx1
  # The mask's own gradient (a computed, soft mask); compiled away when the mask is data.
  g_mask_BxT = jnp.sum(g_assign_BxTxK * probs_BxTxK, axis=-1)
  inner_BxTx1 = jnp.sum(g_probs_BxTxK * probs_BxTxK, axis=-1, keepdims=True)
  g_logits_NxK = (probs_BxTxK * (g_probs_BxTxK - inner_BxTx1)).reshape(B * T, -1)
  # The kernel's gradient as g^T x ([K, N] x [N, F]), transposed: the fast orientation. In
  # bfloat16, g^T is copied first (0.3M values), so that the product takes the native form.
  rows_NxF = x_BxTxF.reshape(B * T, F)
  g_kernel_KxF = sum_over_rows(g_logits_NxK.astype(x_BxTxF.dtype), rows_NxF, acc)
  # The barrier keeps XLA from folding the transpose below back into the product.
  g_kernel_KxF = jax.lax.optimization_barrier(g_kernel_KxF)
  g_bias_K = jnp.sum(g_logits_NxK, axis=0)
  # dx: through the logits and through the weighted sums; compiled away when x is data.
  assign_BxTxK = probs_BxTxK * m_BxTx1
  narrow_kernel_KxF = kernel_FxK.T.astype(x_BxTxF.dtype)  # The forward's kernel.
  g_x_BxTxF = jnp.dot(g_logits_NxK, narrow_kernel_KxF.astype(acc)).reshape(B, T, F)
  g_x_BxTxF = g_x_BxTxF + jnp.einsum("btk,bkf->btf", assign_BxTxK, g_weighted_BxKxF.astype(acc))
  return (
    g_x_BxTxF.astype(x_BxTxF.dtype),
    g_mask_BxT.astype(mask_BxT.dtype),
    g_kernel_KxF.T.astype(kernel_FxK.dtype),
    g_bias_K.astype(bias_K.dtype),
  )


soft_assignment_sums.defvjp(_forward, _backward)
