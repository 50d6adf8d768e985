"""Helpers shared by the layers with hand-written gradients (dbof_pool, netvlad_pool, dense)."""

import jax
import jax.numpy as jnp


def accumulation_dtype(*arrays: jax.Array):
  """float32, or wider if the inputs are (bfloat16 matmuls still accumulate in float32)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def replicated_under_explicit_sharding(x: jax.Array):
  """out_sharding for a product that sums over x's (batch-sharded) rows: replicated when x is
  explicitly sharded (where JAX asks for it), else left to the compiler (None)."""
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(x: jax.Array):
  """out_sharding for a new array whose first axis is split as x's first (the batch,
  or one group of videos per device): x's when x is explicitly sharded (where JAX asks for it),
  else left to the compiler (None)."""
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.spec[0]))


def transposed_copy(x: jax.Array, axes: tuple[int, ...], pad_axis: int = 0) -> jax.Array:
  """jnp.transpose(x, axes) as an array of its own (a real copy, not a view).

  XLA:CPU runs a bfloat16 product natively (bf16 x bf16 -> float32) only when its first operand
  is contracted on its last axis; for any other form it widens both operands to float32. A small
  operand in the wrong orientation is therefore copied transposed first. A bare transpose would
  be folded back into the product; a pad and slice along `pad_axis` (of the result; never the
  batch's, which may be sharded) is not (jaxlib 0.10.2).
  """
  y = jnp.transpose(x, axes)
  pad = [(0, 0)] * y.ndim
  pad[pad_axis] = (0, 1)
  return jax.lax.slice_in_dim(jnp.pad(y, pad), 0, y.shape[pad_axis], axis=pad_axis)


def is_narrow(dtype) -> bool:
  """A float narrower than float32 (bfloat16): its products are written in the native forms."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def sum_over_rows(a: jax.Array, b: jax.Array, acc, groups: int = 0) -> jax.Array:
  """a^T b summed over the rows: a [G.., rows.., I], b [G.., rows.., O] -> [G.., I, O] in `acc`.

  The first `groups` axes are batch axes of the product (kept apart), every other axis but the
  last is summed. Narrow operands are multiplied from a transposed copy of a (the form XLA:CPU
  runs natively). The result is replicated where the rows are explicitly sharded.
  """
  batch = tuple(range(groups))
  rows = tuple(range(groups, a.ndim - 1))
  lhs, lhs_rows = a, rows
  if is_narrow(a.dtype):
    lhs = transposed_copy(a, (*batch, a.ndim - 1, *rows), pad_axis=groups)
    lhs_rows = tuple(r + 1 for r in rows)
  return jax.lax.dot_general(
    lhs,
    b,
    ((lhs_rows, rows), (batch, batch)),
    preferred_element_type=acc,
    out_sharding=replicated_under_explicit_sharding(b),
  )
