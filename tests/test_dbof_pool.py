"""DBoF's fused pooling and its hand-written gradient against autodiff of the plain formula."""

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  dot_operand_dtypes,
  float64_grad,
  mostly_not_bfloat16_valued,
  native_bfloat16_products,
  run_python,
)

from mfb_jax import dbof_pool

jax.config.update("jax_numpy_rank_promotion", "raise")

EPS = 1e-3


def bn(h, mean, var, scale, bias):
  e = lambda v: v[None, None]
  return (h - e(mean)) / jnp.sqrt(e(var) + EPS) * e(scale) + e(bias)


def plain_dbof(x, mask, kernel, scale, bias):
  """relu(BatchNorm(x W)) with the valid frames' batch moments, zeroed padding, max over time."""
  h = jnp.einsum("btf,fh->bth", x, kernel)
  m = mask[:, :, None]
  count = jnp.sum(mask)
  mean = jnp.sum(h * m, axis=(0, 1)) / count
  var = jnp.sum(h * h * m, axis=(0, 1)) / count - mean**2
  y = jax.nn.relu(bn(h, mean, var, scale, bias)) * m
  return jnp.max(y, axis=1), mean, var


def make_case(num_frames: int, seed: int = 0):
  """float64 inputs; video 1 is half padding (with garbage), video 3 has no valid frame."""
  rng = np.random.default_rng(seed)
  B, F, H = 4, 5, 6
  x = rng.normal(size=(B, num_frames, F))
  mask = np.ones((B, num_frames))
  mask[1, num_frames // 2 :] = 0.0
  x[1, num_frames // 2 :] = rng.uniform(-50, 50, size=(num_frames - num_frames // 2, F))
  mask[3] = 0.0
  kernel = rng.normal(size=(F, H))
  scale = np.array([1.0, -0.5, 2.0, 0.3, -1.2, 0.7])  # Both signs: max and min frames.
  bias = rng.normal(size=H) * 0.5
  cotangent = rng.normal(size=(B, H))
  return x, mask, kernel, scale, bias, cotangent


@pytest.mark.parametrize("num_frames", [8, 9, 10, 7])  # 0, 3, 2 and 1 padded frames.
def test_value_moments_and_gradients_match_autodiff(num_frames):
  with jax.enable_x64(True):
    x, mask, kernel, scale, bias, cotangent = map(jnp.asarray, make_case(num_frames))
    pooled, mean, var = dbof_pool.train_pool(x, mask, kernel, scale, bias, EPS)
    want_pooled, want_mean, want_var = plain_dbof(x, mask, kernel, scale, bias)
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, want_var, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(pooled[3]) == 0.0)  # No valid frame: zeros.

    ours = lambda *a: jnp.sum(dbof_pool.train_pool(*a[:2], *a[2:], EPS)[0] * cotangent)
    plain = lambda *a: jnp.sum(plain_dbof(*a)[0] * cotangent)
    args = (x, mask, kernel, scale, bias)
    got = jax.grad(ours, argnums=(0, 2, 3, 4))(*args)
    want = jax.grad(plain, argnums=(0, 2, 3, 4))(*args)
    for name, g, w in zip(("x", "kernel", "scale", "bias"), got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)


def test_eval_pool_uses_the_given_moments():
  with jax.enable_x64(True):
    x, mask, kernel, scale, bias, _ = map(jnp.asarray, make_case(8))
    mean, var = jnp.linspace(-0.5, 0.5, 6), jnp.linspace(0.5, 2.0, 6)
    got = dbof_pool.eval_pool(x, mask, kernel, mean, var, scale, bias, EPS)
    h = jnp.einsum("btf,fh->bth", x, kernel)
    y = jax.nn.relu(bn(h, mean, var, scale, bias)) * mask[:, :, None]
    np.testing.assert_allclose(got, jnp.max(y, axis=1), rtol=1e-12, atol=1e-12)


def test_tied_frames_give_the_gradient_to_the_first_one():
  # Frames 1 and 2 tie for the max. Ours sends the max's gradient to frame 1, which is what
  # autodiff of the plain formula does once frame 2 is lowered by a hair.
  with jax.enable_x64(True):
    x = jnp.array([[[0.0], [2.0], [2.0], [1.0]], [[1.0], [0.0], [-1.0], [0.5]]])
    mask = jnp.ones((2, 4))
    kernel, scale, bias = jnp.ones((1, 1)), jnp.ones(1), jnp.zeros(1)
    ours = lambda x: dbof_pool.train_pool(x, mask, kernel, scale, bias, EPS)[0][0, 0]
    plain = lambda x: plain_dbof(x, mask, kernel, scale, bias)[0][0, 0]
    lowered = x.at[0, 2, 0].add(-1e-9)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(lowered), atol=1e-6)


def test_bfloat16_frames_give_float32_moments_and_a_float32_kernel_gradient():
  """The kernel is cast to bf16 inside the custom gradient, so a float32 kernel's gradient is
  the float32 accumulation itself, never rounded to bf16 (as a cast outside would); a bf16
  kernel still gets a bf16 gradient."""
  x, mask, kernel, scale, bias, cotangent = make_case(8)
  x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
  kernel32 = kernel16.astype(jnp.float32)  # bf16-valued: the cast inside changes nothing.
  scale, bias, mask = (jnp.asarray(v, jnp.float32) for v in (scale, bias, mask))
  pooled, mean, var = dbof_pool.train_pool(x16, mask, kernel32, scale, bias, EPS)
  assert pooled.dtype == mean.dtype == var.dtype == jnp.float32
  want, _, _ = plain_dbof(x16.astype(jnp.float32), mask, kernel32, scale, bias)
  np.testing.assert_allclose(pooled, want, rtol=2e-2, atol=2e-2)

  def loss(k, x=x16):
    return jnp.sum(dbof_pool.train_pool(x, mask, k, scale, bias, EPS)[0] * cotangent)

  got = jax.grad(loss)(kernel32)
  assert got.dtype == jnp.float32
  want = float64_grad(loss, kernel32, x16)  # The same bf16 values in float64 arithmetic.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(want))))
  assert mostly_not_bfloat16_valued(got)
  assert jax.grad(loss)(kernel16).dtype == jnp.bfloat16


def test_bfloat16_kernel_gradient_equals_the_float32_one_on_the_same_values():
  """The bf16 backward (bf16 products, float32 accumulation) computes the same
  gradient as float32 arithmetic on the bf16-rounded inputs, within bf16 rounding."""
  x, mask, kernel, scale, bias, cotangent = make_case(9)
  x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
  scale, bias, mask = (jnp.asarray(v, jnp.float32) for v in (scale, bias, mask))

  def loss(x, k):
    return jnp.sum(dbof_pool.train_pool(x, mask, k, scale, bias, EPS)[0] * cotangent)

  got = jax.grad(loss, argnums=1)(x16, kernel16).astype(jnp.float32)
  want = jax.grad(loss, argnums=1)(x16.astype(jnp.float32), kernel16.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.max(np.abs(want)))


def test_bfloat16_frames_are_never_widened():
  """With bfloat16 frames every product over the frames (the fc, the Gram matrix) keeps bf16
  operands; only the F x F Gram matrix times W runs in float32. XLA:CPU widened the former
  one-piece Gram product (80 GFLOP per paper-sized step) to float32."""
  if not native_bfloat16_products():
    pytest.skip("this backend widens even a plain bfloat16 product")
  B, T, F, H = 8, 12, 64, 48
  x16 = jax.random.normal(jax.random.key(0), (B, T, F)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(1), (F, H))  # float32, as aggregation.DBoF's.
  mask, scale, bias = jnp.ones((B, T)), jnp.ones((H,)), jnp.zeros((H,))

  def loss(kernel, x):  # x as an argument: a constant would be folded.
    pooled, mean, var = dbof_pool.train_pool(x, mask, kernel, scale, bias, EPS)
    return jnp.sum(pooled) + jnp.sum(mean) + jnp.sum(var)

  hlo = jax.jit(jax.value_and_grad(loss)).lower(kernel, x16).compile().as_text()
  dtypes = dot_operand_dtypes(hlo)
  assert dtypes.count(("bf16", "bf16")) == 2  # The fc and the Gram matrix, per chunk.
  assert dtypes.count(("f32", "f32")) == len(dtypes) - 2  # G W and (sum_n m_n x_n) W.


def _scan_lengths(fn, *args) -> list[int]:
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        found.append(eqn.params["length"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr)
  return found


@pytest.mark.parametrize("num_frames, chunks", [(300, 75), (301, 76), (7, 2)])
def test_frame_counts_are_padded_to_whole_chunks_of_four(num_frames, chunks):
  """A frame count that 4 does not divide is padded with masked frames (values above), not
  scanned a frame at a time: 301 frames are 76 steps of 4, not 301 of 1."""
  x = jnp.zeros((2, num_frames, 3))
  mask, kernel, scale, bias = jnp.ones((2, num_frames)), jnp.ones((3, 5)), jnp.ones(5), jnp.zeros(5)
  pool = lambda x: dbof_pool.train_pool(x, mask, kernel, scale, bias, EPS)
  assert _scan_lengths(pool, x) == [chunks]


SHARDED = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mfb_jax import dbof_pool
B, T, F, H = 8, 12, 16, 24
rng = np.random.default_rng(0)
x = rng.normal(size=(B, T, F)).astype(np.float32)
kernel = rng.normal(size=(F, H)).astype(np.float32)
mask = np.ones((B, T), np.float32)
mask[1, 5:] = 0.0
scale, bias = np.linspace(-1, 1, H).astype(np.float32), np.zeros(H, np.float32)
def loss(kernel, x, mask):
  pooled, mean, var = dbof_pool.train_pool(x, mask, kernel, scale, bias, 1e-3)
  return jnp.sum(pooled * pooled) + jnp.sum(mean) + jnp.sum(var)
step = jax.jit(jax.value_and_grad(loss))
want_value, want_grad = step(kernel, x, mask)
for kind in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
  data = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    args = (kernel, jax.device_put(x, data), jax.device_put(mask, data))
    hlo = step.lower(*args).compile().as_text()
    value, grad = step(*args)
  bodies = [c for c in re.split(r"\\n(?=\\S)", hlo) if not c.startswith("ENTRY")]
  print(json.dumps({
    "axis_type": str(kind),
    "devices": jax.device_count(),
    "all_reduces_in_loops": sum(" all-reduce(" in c for c in bodies),
    "all_reduces": hlo.count(" all-reduce("),
    "value_error": float(abs(value - want_value)),
    "grad_error": float(np.max(np.abs(grad - want_grad))),
  }))
"""


def test_a_sharded_batch_sums_its_gram_matrices_apart_and_reduces_them_once():
  """On two devices each sums the Gram matrix of its own videos in the scan; an all-reduce
  inside the scan would be one per chunk of frames (75 of 4 MB a paper-sized step)."""
  result = run_python(
    ["-c", SHARDED], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # The mesh's axes as the trainer's (Auto) and as jax.make_mesh's default (Explicit), where
  # the scan's carry once lacked the batch's sharding (a ShardingTypeError).
  auto, explicit = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]
  for got in (auto, explicit):
    assert got["devices"] == 2
    assert got["all_reduces"] > 0  # The batch moments are reduced across devices ...
    assert got["all_reduces_in_loops"] == 0  # ... but not in any computation a loop calls.
    assert got["value_error"] < 1e-3 and got["grad_error"] < 1e-3
  assert (auto["axis_type"], explicit["axis_type"]) == ("AxisType.Auto", "AxisType.Explicit")
