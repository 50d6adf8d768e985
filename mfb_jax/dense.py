"""The models' dense layer: nn.Dense whose bfloat16 kernel gradient keeps the kernel's orientation.

With `dtype=bfloat16` (float32 parameters, bfloat16 matmuls) flax casts the kernel to bfloat16
and multiplies, and JAX writes the kernel's gradient as a transpose of g^T x. XLA:CPU does not fold
that transpose into the product across the conversion to bfloat16; it pushes it into the
consumers instead, so Adam's first- and second-moment updates each read the gradient column by
column. For MFB's 8192 x 4096 U that took 146 thread-ms per update (18 in float32), and the
bfloat16 NetVLAD+MFB step spent more time in Adam than in its matmuls (`mfb_jax/step_profile.py`;
BENCHMARKS.md). Here the product's backward computes x^T g directly in the kernel's [in, out]
orientation. The arithmetic is JAX's own rule: float32 accumulation, rounded once to the dtype of
the bfloat16 kernel copy, so gradients equal autodiff's up to the order of the float32 sums
(tested). float32 layers call lax.dot_general unchanged; parameter names and shapes are
nn.Dense's (checkpoints load either way).

All three bfloat16 products are also written in the forms XLA:CPU runs natively on CPUs with bf16
instructions (YNNPACK: bf16 x bf16 -> float32, first operand contracted on its last axis); for
any other form it widens both operands to float32. On a 2-core Zen 4 this, with NetVLAD keeping
float32 frames, took the bfloat16 NetVLAD+MFB step from 345-353 to 283-303 ms (medians of
interleaved bench runs; BENCHMARKS.md, fifth session).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mfb_jax.pooling_common import accumulation_dtype, replicated_under_explicit_sharding


def _product(x, kernel):
  """x [..., I] . kernel [I, O] -> [..., O], in the inputs' dtype (as flax's Dense does).

  Asked for with float32 accumulation and rounded after: XLA:CPU runs a bfloat16 x bfloat16 ->
  float32 product natively (YNNPACK), but upcasts both operands to float32 for a bfloat16 result.
  """
  acc = accumulation_dtype(x, kernel)
  return lax.dot_general(
    x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc
  ).astype(x.dtype)


def _features_first(x):
  """x [..., I] as its own array of shape [I, ...] (a real transpose, not a view).

  A product that contracts its first operand's leading axis, as x^T g does, is one XLA:CPU's
  bfloat16 kernels do not take: XLA then upcasts both operands and multiplies in float32 (about
  half the speed, plus the conversions). Fed a transposed copy, the product is a plain row-major
  one. A bare transpose would be folded back into the product; a pad and slice is not (jaxlib
  0.10.2). The copy is of the activations (2 MB for MFB's U), not of the kernel.
  """
  x_t = jnp.moveaxis(x, -1, 0)
  return jnp.pad(x_t, [(0, 1)] + [(0, 0)] * (x.ndim - 1))[: x.shape[-1]]


@jax.custom_vjp
def kernel_oriented_product(x, kernel):
  """x [..., I] . kernel [I, O]; its kernel gradient is computed as x^T g, shaped [I, O]."""
  return _product(x, kernel)


def _forward(x, kernel):
  return _product(x, kernel), (x, kernel)


def _backward(saved, g):
  x, kernel = saved
  acc = accumulation_dtype(x, kernel)
  rows = tuple(range(x.ndim - 1))  # Every axis of x but the features: summed for the kernel.
  g_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc)
  g_kernel = lax.dot_general(
    _features_first(x),
    g,
    ((tuple(a + 1 for a in rows), rows), ((), ())),
    preferred_element_type=acc,
    out_sharding=replicated_under_explicit_sharding(x),
  )
  return g_x.astype(x.dtype), g_kernel.astype(kernel.dtype)


kernel_oriented_product.defvjp(_forward, _backward)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general, with kernel_oriented_product for nn.Dense's product in a narrow dtype."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense_product = (
    rhs.ndim == 2
    and tuple(lhs_contract) == (lhs.ndim - 1,)
    and tuple(rhs_contract) == (0,)
    and not lhs_batch
    and not rhs_batch
  )
  floating = jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == rhs.dtype
  narrow = floating and jnp.finfo(lhs.dtype).bits < 32
  if dense_product and narrow and precision is None and preferred_element_type is None:
    return kernel_oriented_product(lhs, rhs)
  return lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


def Dense(features: int, **kwargs) -> nn.Dense:  # noqa: N802 - stands in for the nn.Dense class.
  """nn.Dense(features, **kwargs) with this module's dot_general."""
  return nn.Dense(features, dot_general=dot_general, **kwargs)
