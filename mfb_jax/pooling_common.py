"""Helpers shared by the pooling layers with hand-written gradients (dbof_pool, netvlad_pool)."""

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
