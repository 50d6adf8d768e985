"""Video-level fusion of the aggregated rgb and audio vectors (paper, sec. 3.1 and 4.3).

Every fusion is called as `fusion(video_BxV, audio_BxA, train=bool) -> fused_BxO`. A class may
set `modalities` to the inputs it reads; the model then skips aggregating the other one and passes
None in its place (single-modality baselines cost and count only what they use).

Shape letters: B batch, V aggregated video size, A aggregated audio size, P = k*o projection
size, O fused size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import dense
from mfb_jax.aggregation import l2_normalize

Dtype = Any


def dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Inverted dropout with the module's 'dropout' rng, only when training.

  Unlike nn.Dropout, the random mask takes the sharding of `x`: on a mesh with Explicit axes
  (jax.make_mesh's default) nn.Dropout's unsharded mask fails. The train step's mesh has Auto
  axes (train.make_mesh), where both work.
  """
  if not train or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(
    module.make_rng("dropout"), keep_prob, x.shape, out_sharding=jax.typeof(x).sharding
  )
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class AudioOnly(nn.Module):
  """Single-modality baseline: the aggregated audio vector."""

  modalities = ("audio",)

  def __call__(
    self, video_BxV: jax.Array | None, audio_BxA: jax.Array, train: bool = False
  ) -> jax.Array:
    return audio_BxA


class VideoOnly(nn.Module):
  """Single-modality baseline: the aggregated rgb vector."""

  modalities = ("video",)

  def __call__(
    self, video_BxV: jax.Array, audio_BxA: jax.Array | None, train: bool = False
  ) -> jax.Array:
    return video_BxV


class Concat(nn.Module):
  """Concatenation of the two aggregated vectors."""

  def __call__(self, video_BxV: jax.Array, audio_BxA: jax.Array, train: bool = False) -> jax.Array:
    return jnp.concatenate([video_BxV, audio_BxA], axis=-1)


class FcConcat(nn.Module):
  """One linear FC per modality, sized like MFB's projections U and V, then concatenation."""

  hidden_size: int = 4096  # Paper: "the same parameter settings" as MFB, i.e. k*o.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video_BxV: jax.Array, audio_BxA: jax.Array, train: bool = False) -> jax.Array:
    video_BxP = dense.Dense(self.hidden_size, dtype=self.dtype, name="video_fc")(video_BxV)
    audio_BxP = dense.Dense(self.hidden_size, dtype=self.dtype, name="audio_fc")(audio_BxA)
    return jnp.concatenate([video_BxP, audio_BxP], axis=-1).astype(jnp.float32)


class MFB(nn.Module):
  """Multi-modal factorized bilinear pooling: z = SumPool_k((U^T l) * (V^T a)), ReLU, L2, dropout.

  Sows the pre-ReLU bilinear output as 'intermediates'/'bilinear_BxO' (free unless that collection
  is mutable) so it can be checked against l^T W_j a.
  """

  factor: int = 4  # k: rank of each factorized bilinear form W_j = sum_i U_i V_i^T.
  output_dim: int = 1024  # o: fused size.
  dropout: float = 0.1
  # The unit-norm output is multiplied by this (1.0: the paper's plain L2 normalization). A unit
  # vector of o entries moves the classifier's logits ~sqrt(o) times slower per Adam step than
  # features of entry-size ~1; sqrt(o) removes that handicap in short runs (README).
  output_scale: float = 1.0
  dtype: Dtype = jnp.float32  # Matmul dtype; the product and normalization run in float32.

  @nn.compact
  def __call__(self, video_BxV: jax.Array, audio_BxA: jax.Array, train: bool = False) -> jax.Array:
    k, o = self.factor, self.output_dim
    video_BxP = dense.Dense(k * o, dtype=self.dtype, name="U")(video_BxV).astype(jnp.float32)
    audio_BxP = dense.Dense(k * o, dtype=self.dtype, name="V")(audio_BxA).astype(jnp.float32)
    # Sum pooling over groups of k consecutive elements: element j*k + i belongs to output j.
    bilinear_BxO = (video_BxP * audio_BxP).reshape(-1, o, k).sum(axis=-1)
    self.sow("intermediates", "bilinear_BxO", bilinear_BxO)
    # The paper replaces MFB's signed square root (power normalization) by a ReLU.
    fused_BxO = self.output_scale * l2_normalize(nn.relu(bilinear_BxO), axis=-1)
    return dropout(self, fused_BxO, self.dropout, train)
