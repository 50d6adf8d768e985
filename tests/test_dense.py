"""dense.Dense: nn.Dense's values and variables; float32 kernel gradients, never transposed."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_operand_dtypes, native_bfloat16_products
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mfb_jax import dense

BF16_ULP = 2.0**-7  # bfloat16's relative spacing: gradients may differ by the order of f32 sums.


def layers(dtype, features=16):
  return dense.Dense(features, dtype=dtype), nn.Dense(features, dtype=dtype)


def loss_and_grads(layer, variables, x, cotangent):
  def loss(params, x):
    y = layer.apply({"params": params}, x)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    variables["params"], x
  )
  return y, grads


@pytest.mark.parametrize("shape", [(8, 24), (3, 5, 24)])
def test_bfloat16_values_and_gradients_equal_nn_dense(shape):
  """Same variables (names, shapes, init values), same outputs, gradients within a bfloat16
  rounding of nn.Dense's (whose kernel gradient is rounded to bfloat16; ours is not)."""
  ours, flax_layer = layers(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, flax_layer.init(jax.random.key(1), x))
  cotangent = jax.random.normal(jax.random.key(2), (*shape[:-1], 16))
  y, (g_params, g_x) = loss_and_grads(ours, variables, x, cotangent)
  want_y, (want_params, want_x) = loss_and_grads(flax_layer, variables, x, cotangent)
  assert y.dtype == jnp.bfloat16 and g_x.dtype == x.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
  pairs = zip(jax.tree.leaves(g_params), jax.tree.leaves(want_params), strict=True)
  for got, want in [(g_x, want_x), *pairs]:
    assert got.dtype == want.dtype == jnp.float32  # The float32 parameters' gradients.
    np.testing.assert_allclose(got, want, rtol=BF16_ULP, atol=1e-6)


def test_bfloat16_kernel_gradient_is_the_float32_sum_of_bfloat16_products():
  """The kernel's gradient is x^T g over the bfloat16 operands, summed and returned in float32:
  not rounded to bfloat16 on its way to the float32 kernel (as nn.Dense's is)."""
  layer = dense.Dense(16, dtype=jnp.bfloat16, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (64, 24))
  variables = layer.init(jax.random.key(1), x)
  cotangent = jax.random.normal(jax.random.key(2), (64, 16))
  _, (g_params, _) = loss_and_grads(layer, variables, x, cotangent)
  g_kernel = np.asarray(g_params["kernel"])
  # The cotangent reaching the product is d(sum(y * c))/dy = c, in y's dtype (bfloat16).
  x16 = np.asarray(x.astype(jnp.bfloat16), np.float64)
  c16 = np.asarray(cotangent.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(g_kernel, x16.T @ c16, rtol=1e-5, atol=1e-5)
  rounded = np.asarray(jnp.asarray(g_kernel).astype(jnp.bfloat16), np.float32)
  assert np.mean(g_kernel != rounded) > 0.9  # Float32 precision, not bfloat16 values widened.


def test_float32_layers_trace_as_nn_dense():
  """float32 layers take the plain product: the same jaxpr as nn.Dense, with and without bias."""
  x = jnp.ones((4, 6))
  for kwargs in (dict(dtype=jnp.float32), dict(), dict(use_bias=False)):
    ours, theirs = dense.Dense(3, **kwargs), nn.Dense(3, **kwargs)
    variables = ours.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, variables, theirs.init(jax.random.key(0), x))
    assert str(jax.make_jaxpr(ours.apply)(variables, x)) == str(
      jax.make_jaxpr(theirs.apply)(variables, x)
    )


def test_only_a_narrow_dtype_takes_the_custom_gradient():
  x = jnp.ones((4, 6))
  for dtype, custom in ((jnp.float32, False), (jnp.bfloat16, True)):
    layer = dense.Dense(3, dtype=dtype)
    variables = layer.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x))
    assert ("custom_vjp_call" in jaxpr) == custom, dtype


def kernel_update_hlo(layer_product) -> str:
  """Compiled HLO of a bfloat16 product's kernel gradient feeding an Adam-style moment update."""
  rows, columns, batch = 256, 128, 32

  def update(kernel, moment, x, cotangent):
    def loss(kernel):
      y = layer_product(x.astype(jnp.bfloat16), kernel)
      return jnp.sum(y.astype(jnp.float32) * cotangent)

    return 0.9 * moment + 0.1 * jax.grad(loss)(kernel)

  shapes = [(rows, columns), (rows, columns), (batch, rows), (batch, columns)]
  args = [jnp.ones(shape) for shape in shapes]
  return jax.jit(update).lower(*args).compile().as_text()


def test_the_moment_update_reads_the_kernel_gradient_untransposed():
  """The bug this module exists for: with autodiff, XLA:CPU moves the gradient's transpose into
  the moment update (a column-wise read: 8x slower on MFB's U); here there is no transpose."""
  plain = lambda x, k: jax.lax.dot_general(x, k.astype(x.dtype), (((1,), (0,)), ((), ())))
  assert kernel_sized_transposes(kernel_update_hlo(plain))  # The test sees the problem.
  assert not kernel_sized_transposes(kernel_update_hlo(dense.product))


def kernel_sized_transposes(hlo: str) -> list[str]:
  """Transposes with as many elements as kernel_update_hlo's kernel (256 x 128); the products'
  own transposed copies of the activations (256 x 32) are not counted."""
  shapes = re.findall(r"= \w+\[(\d+),(\d+)\]\{[\d,]*\} transpose\(", hlo)
  return [f"{a}x{b}" for a, b in shapes if int(a) * int(b) == 256 * 128]


def test_explicitly_sharded_batch_gives_the_unsharded_gradients():
  layer = dense.Dense(8, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (6, 12))
  variables = layer.init(jax.random.key(1), x)
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x).astype(jnp.float32) ** 2)))
  expected = grad(variables, x)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  sharded = grad(
    jax.device_put(variables, NamedSharding(mesh, P())),
    jax.device_put(x, NamedSharding(mesh, P("data"))),
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=BF16_ULP), sharded, expected)


def test_integer_and_wide_products_take_the_plain_path():
  ints = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  np.testing.assert_array_equal(dense.product(ints, ints.T), ints @ ints.T)
  traced = lambda x, k: str(jax.make_jaxpr(dense.product)(x, k))
  f32, bf16 = jnp.ones((2, 3)), jnp.ones((3, 2), jnp.bfloat16)
  assert "custom_vjp_call" in traced(f32.astype(jnp.bfloat16), bf16.astype(jnp.float32))
  assert "custom_vjp_call" not in traced(f32, bf16)  # A wide input: the kernel is widened.
  assert dense.product(f32, bf16).dtype == jnp.float32


def test_bfloat16_products_keep_bfloat16_operands():
  """XLA:CPU runs bf16 x bf16 -> f32 products natively where the CPU has bf16 instructions, but
  widens both operands to float32 for a bf16 result or a transposed first operand (x^T g): the
  layer's forward, input gradient and kernel gradient must all avoid those forms."""
  if not native_bfloat16_products():
    pytest.skip("this backend widens even a plain bfloat16 product")
  x = jax.random.normal(jax.random.key(0), (128, 1024))
  layer = dense.Dense(512, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(1), x)
  loss = lambda v, x: jnp.sum(layer.apply(v, x).astype(jnp.float32) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text()
  assert dot_operand_dtypes(hlo) == [("bf16", "bf16")] * 3
