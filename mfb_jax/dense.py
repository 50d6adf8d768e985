"""The models' dense layer: nn.Dense's variables and arithmetic, with a mixed-precision gradient.

With `dtype=bfloat16` (float32 parameters, bfloat16 matmuls) the float32 kernel is cast to
bfloat16 *inside* the product's custom gradient, so that:

- the kernel's gradient reaches Adam in float32, straight from the product's float32
  accumulation. nn.Dense casts the kernel before the product, so autodiff rounds the kernel's
  gradient to bfloat16 (the cotangent of the bfloat16 copy) and widens it again: a lost 16 bits
  and two passes over every kernel-sized gradient (about 28 thread-ms of a bfloat16 NetVLAD+MFB
  step on a 2-core Xeon with AMX; BENCHMARKS.md, sixth session);
- the kernel's gradient is computed as x^T g in the kernel's [in, out] orientation. JAX writes
  it as a transpose of g^T x, which XLA:CPU pushes into Adam's moment updates, which then read
  the gradient column by column (146 thread-ms per update of MFB's U, against 18 in float32:
  the bfloat16 NetVLAD+MFB step went from 823 to 458 ms; fourth session);
- all three products take the forms XLA:CPU runs natively on CPUs with bf16 instructions
  (YNNPACK: bf16 x bf16 -> float32, the first operand contracted on its last axis); for any
  other form it widens both operands to float32 (fifth session: 345-353 -> 283-303 ms on a Zen 4).

float32 layers trace exactly as nn.Dense. Parameter names, shapes, initializers and rngs are
nn.Dense's, so checkpoints load either way (tested).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mfb_jax.pooling_common import accumulation_dtype, is_narrow, sum_over_rows

Dtype = Any


def _product(x, kernel):
  """x [..., I] . kernel [I, O] -> [..., O], in the inputs' dtype (as flax's Dense does).

  Asked for with float32 accumulation and rounded after: XLA:CPU runs a bfloat16 x bfloat16 ->
  float32 product natively (YNNPACK), but upcasts both operands to float32 for a bfloat16 result.
  """
  acc = accumulation_dtype(x, kernel)
  return lax.dot_general(
    x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc
  ).astype(x.dtype)


@jax.custom_vjp
def mixed_precision_product(x, kernel):
  """x [..., I] (narrow dtype) . kernel [I, O] (float32) in x's dtype; the kernel's gradient
  is the float32 sum x^T g, shaped [I, O]."""
  return _product(x, kernel.astype(x.dtype))


def _forward(x, kernel):
  narrow_kernel = kernel.astype(x.dtype)  # Saved for the input's gradient: cast once a step.
  return _product(x, narrow_kernel), (x, narrow_kernel)


def _backward(saved, g):
  x, narrow_kernel = saved
  acc = accumulation_dtype(x, narrow_kernel)
  g_x = lax.dot_general(
    g, narrow_kernel, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc
  )
  # x^T g over every axis but the features, from a transposed copy of x: contracting x's leading
  # axes is a form XLA:CPU's bfloat16 kernels do not take (it upcasts both operands: about half
  # the speed, plus the conversions). The copy is of the activations (2 MB for MFB's U).
  g_kernel = sum_over_rows(x, g, acc)
  return g_x.astype(x.dtype), g_kernel  # The float32 accumulation is the float32 kernel's.


mixed_precision_product.defvjp(_forward, _backward)


def product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., I] . kernel [I, O] in x's dtype: mixed_precision_product when x is a narrower float
  than the kernel, else nn.Dense's plain lax.dot_general."""
  floats = jnp.issubdtype(kernel.dtype, jnp.floating) and is_narrow(x.dtype)
  if floats and jnp.finfo(x.dtype).bits < jnp.finfo(kernel.dtype).bits:
    return mixed_precision_product(x, kernel)
  return lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))


class Dense(nn.Module):
  """nn.Dense (same fields, variables and float32 trace) whose narrow-dtype product is
  mixed_precision_product."""

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None  # Computation dtype; None: the inputs' and parameters' promotion.
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    shape = (jnp.shape(inputs)[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(inputs, kernel)
    y = product(jnp.asarray(inputs, dtype), kernel)
    if bias is not None:
      y += jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y
