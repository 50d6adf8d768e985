"""NetVLAD's soft-assignment sums and their hand-written gradient against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  dot_operand_dtypes,
  float64_grad,
  mostly_not_bfloat16_valued,
  native_bfloat16_products,
)

from mfb_jax import netvlad_pool

jax.config.update("jax_numpy_rank_promotion", "raise")


def plain_sums(x, mask, kernel, bias):
  """The formula as written in the paper, differentiated by JAX: softmax, mask, sums."""
  probs = jax.nn.softmax(jnp.einsum("btf,fk->btk", x, kernel) + bias[None, None], axis=-1)
  assign = probs * mask[:, :, None]
  return jnp.einsum("btk,btf->bkf", assign, x), jnp.sum(assign, axis=1)


def make_case(seed: int = 0):
  """float64; video 1 is half padding (with garbage in it), video 2 has no valid frame.

  The mask is differentiated too (as a soft mask computed upstream would be)."""
  rng = np.random.default_rng(seed)
  B, T, F, K = 3, 6, 5, 4
  x = rng.normal(size=(B, T, F))
  mask = np.ones((B, T))
  mask[1, 3:] = 0.0
  x[1, 3:] = rng.uniform(-50, 50, size=(3, F))
  mask[2] = 0.0
  kernel, bias = rng.normal(size=(F, K)), rng.normal(size=K)
  cot_weighted, cot_mass = rng.normal(size=(B, K, F)), rng.normal(size=(B, K))
  return x, mask, kernel, bias, cot_weighted, cot_mass


def test_values_and_all_gradients_match_autodiff_of_the_plain_formula():
  with jax.enable_x64(True):
    x, mask, kernel, bias, cot_w, cot_m = map(jnp.asarray, make_case())
    weighted, mass = netvlad_pool.soft_assignment_sums(x, mask, kernel, bias)
    want_weighted, want_mass = plain_sums(x, mask, kernel, bias)
    np.testing.assert_allclose(weighted, want_weighted, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mass, want_mass, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(weighted[2]) == 0.0) and np.all(np.asarray(mass[2]) == 0.0)

    def scalar(sums_fn):
      return lambda *a: jnp.sum(sums_fn(*a)[0] * cot_w) + jnp.sum(sums_fn(*a)[1] * cot_m)

    args = (x, mask, kernel, bias)
    got = jax.grad(scalar(netvlad_pool.soft_assignment_sums), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(scalar(plain_sums), argnums=(0, 1, 2, 3))(*args)
    for name, g, w in zip(("x", "mask", "kernel", "bias"), got, want, strict=True):
      assert g.shape == w.shape, name
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)
    # Padded frames get no gradient, whatever garbage they hold.
    assert np.all(np.asarray(got[0][1, 3:]) == 0.0) and np.all(np.asarray(got[0][2]) == 0.0)


def test_gradients_are_right_under_jit_and_vmap():
  with jax.enable_x64(True):
    x, mask, kernel, bias, cot_w, _ = map(jnp.asarray, make_case(seed=1))
    loss = lambda sums_fn: lambda k, b: jnp.sum(sums_fn(x, mask, k, b)[0] * cot_w)
    got = jax.jit(jax.grad(loss(netvlad_pool.soft_assignment_sums), argnums=(0, 1)))(kernel, bias)
    want = jax.grad(loss(plain_sums), argnums=(0, 1))(kernel, bias)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10), got, want)
    kernels = jnp.stack([kernel, 2.0 * kernel])
    per_kernel = jax.vmap(jax.grad(loss(netvlad_pool.soft_assignment_sums)), (0, None))
    np.testing.assert_allclose(
      per_kernel(kernels, bias)[1], jax.grad(loss(plain_sums))(2.0 * kernel, bias), rtol=1e-10
    )


def test_bfloat16_inputs_give_float32_sums_and_gradients_of_the_input_dtypes():
  x, mask, kernel, bias, cot_w, _ = make_case()
  x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
  mask, bias = jnp.asarray(mask, jnp.float32), jnp.asarray(bias, jnp.float32)
  weighted, mass = netvlad_pool.soft_assignment_sums(x16, mask, kernel16, bias)
  assert weighted.dtype == mass.dtype == jnp.float32
  want, _ = plain_sums(x16.astype(jnp.float32), mask, kernel16.astype(jnp.float32), bias)
  np.testing.assert_allclose(weighted, want, rtol=3e-2, atol=3e-2)
  loss = lambda xx, k, b: jnp.sum(netvlad_pool.soft_assignment_sums(xx, mask, k, b)[0] * cot_w)
  g_x, g_kernel, g_bias = jax.grad(loss, argnums=(0, 1, 2))(x16, kernel16, bias)
  assert (g_x.dtype, g_kernel.dtype, g_bias.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  want_kernel = jax.grad(
    lambda k: jnp.sum(plain_sums(x16.astype(jnp.float32), mask, k, bias)[0] * cot_w)
  )(kernel16.astype(jnp.float32))
  np.testing.assert_allclose(g_kernel.astype(jnp.float32), want_kernel, rtol=5e-2, atol=5e-2)


def test_a_float32_kernel_with_bfloat16_frames_gets_a_float32_gradient():
  """The kernel is cast to the frames' dtype inside the custom gradient (as aggregation.NetVLAD
  passes its float32 parameter), so its gradient is the float32 accumulation, not rounded to
  bfloat16."""
  x, mask, kernel, bias, cot_w, _ = make_case()
  x16 = jnp.asarray(x, jnp.bfloat16)
  kernel32 = jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32)  # bf16-valued.
  mask, bias = jnp.asarray(mask, jnp.float32), jnp.asarray(bias, jnp.float32)

  def loss(k, xx=x16):
    return jnp.sum(netvlad_pool.soft_assignment_sums(xx, mask, k, bias)[0] * cot_w)

  got = jax.grad(loss)(kernel32)
  assert got.dtype == jnp.float32
  want = float64_grad(loss, kernel32, x16)  # The same bf16 values in float64 arithmetic.
  # Only the bf16 rounding of the products' operands (assignments, g) separates the two.
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * float(np.max(np.abs(want))))
  assert mostly_not_bfloat16_valued(got)


def test_the_kernel_gradient_is_computed_in_the_fast_orientation():
  """The compiled backward multiplies g^T x ([K, N] x [N, F]), not x^T g (3x slower on CPU)."""
  x, mask, kernel, bias, cot_w, _ = (jnp.asarray(a, jnp.float32) for a in make_case())
  loss = lambda k: jnp.sum(netvlad_pool.soft_assignment_sums(x, mask, k, bias)[0] * cot_w)
  hlo = jax.jit(jax.grad(loss)).lower(kernel).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  K, F = kernel.shape[1], kernel.shape[0]
  assert any(f"f32[{K},{F}]" in line.split("=")[1] for line in dots), dots
  assert not any(f"f32[{F},{K}]" in line.split("=")[1] for line in dots), dots


def test_bfloat16_frames_are_never_widened():
  """With bfloat16 frames (as the pipeline delivers them to a bfloat16 model) all four products
  over the frames, forward and backward, keep bfloat16 operands: XLA:CPU widens a bf16 product
  that is not in its native form, a float32 pass over the whole frame tensor."""
  if not native_bfloat16_products():
    pytest.skip("this backend widens even a plain bfloat16 product")
  B, T, F, K = 16, 30, 128, 8
  x16 = jax.random.normal(jax.random.key(0), (B, T, F)).astype(jnp.bfloat16)
  mask = jnp.ones((B, T), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (F, K))  # float32, as aggregation.NetVLAD's.
  bias, cot = jnp.zeros((K,)), jax.random.normal(jax.random.key(2), (B, K, F))

  def loss(kernel, bias, x, cot):  # x and cot as arguments: constants would be folded.
    weighted, mass = netvlad_pool.soft_assignment_sums(x, mask, kernel, bias)
    return jnp.sum(weighted * cot) + jnp.sum(mass)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  hlo = step.lower(kernel, bias, x16, cot).compile().as_text()
  assert dot_operand_dtypes(hlo) == [("bf16", "bf16")] * 4
