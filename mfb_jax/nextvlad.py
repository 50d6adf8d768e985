"""NeXtVLAD (Lin et al. 2018, YouTube-8M 2018 challenge): NetVLAD over grouped, expanded frames.

Each frame x_t (F values) is expanded by an fc to lambda*F values and split into G groups of
F' = lambda*F/G. Group g of frame t is soft-assigned to K clusters (softmax over k of a linear
function of the whole expanded frame) and weighted by a sigmoid attention of the frame for that
group; the residuals of every (frame, group) pair to K shared centres of size F' are summed:

  vlad[k] = sum_t sum_g sigmoid(attn_g(x~_t)) * softmax_k(assign_g(x~_t)) * (x~_t^g - c_k)

then intra-normalized (per cluster) and L2-normalized, giving K*F' = K*lambda*F/G values.
Differences from the original: no BatchNorm on the assignment logits (a bias instead, as our
NetVLAD) and none on the output (our NetVLAD has none either); padded frames get zero weight, so
padding never changes a video's output.

Shape letters: B batch, T frames, F input size, X = lambda*F expanded size, G groups,
F' (written Fg) = X/G group size, K clusters, N = B*T frames of the batch.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import dense
from mfb_jax.aggregation import l2_normalize
from mfb_jax.errors import ConfigError

Dtype = Any


class NeXtVLAD(nn.Module):
  """Grouped NetVLAD with per-group attention; output K * expansion * F / groups."""

  num_clusters: int = 32  # K (the NeXtVLAD paper: 128, followed by a 2048-unit fc).
  expansion: int = 2  # lambda.
  groups: int = 8  # G; expansion * F must be divisible by it.
  dtype: Dtype = jnp.float32  # Matmul dtype; softmax, sigmoid and normalizations in float32.

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, mask_BxT: jax.Array, train: bool = False) -> jax.Array:
    B, T, F = x_BxTxF.shape
    K, G, X = self.num_clusters, self.groups, self.expansion * F
    if X % G:
      raise ConfigError(
        f"config.model.nextvlad: expansion * input size = {self.expansion} * {F} = {X} is not "
        f"divisible by groups={G}"
      )
    Fg = X // G
    # One 2-D (B*T, F) matmul for the expansion, as DBoF's fc.
    expanded_NxX = dense.Dense(X, dtype=self.dtype, name="expand")(x_BxTxF.reshape(B * T, F))
    init = nn.initializers.normal(stddev=X**-0.5)
    attention_layer = dense.Dense(G, dtype=self.dtype, kernel_init=init, name="attention")
    assign_layer = dense.Dense(G * K, dtype=self.dtype, kernel_init=init, name="assign")

    # Reshapes split the sharded B*T axis alone, then the last axis: other reshapes of an
    # explicitly sharded batch have no sharding rule.
    def frames_and(x_NxY: jax.Array, *shape: int) -> jax.Array:
      return x_NxY.reshape(B, T, x_NxY.shape[-1]).reshape(B, T, *shape)

    gate_NxG = jax.nn.sigmoid(attention_layer(expanded_NxX).astype(jnp.float32))
    logits_BxTxGxK = frames_and(assign_layer(expanded_NxX).astype(jnp.float32), G, K)
    # Padded frames weigh zero, so they add no residual.
    weight_BxTxG = frames_and(gate_NxG, G) * mask_BxT[:, :, None]
    weight_BxTxGxK = jax.nn.softmax(logits_BxTxGxK, axis=-1) * weight_BxTxG[..., None]
    # Every (frame, group) pair is one descriptor of Fg values.
    groups_BxTxGxFg = frames_and(expanded_NxX, G, Fg)
    centres_KxFg = self.param("centres", nn.initializers.normal(stddev=Fg**-0.5), (K, Fg))
    # sum_tg w_tgk (x_tg - c_k) = sum_tg w_tgk x_tg - (sum_tg w_tgk) c_k: one batched matmul.
    weighted_BxKxFg = jnp.einsum(
      "btgk,btgf->bkf",
      weight_BxTxGxK.astype(self.dtype),
      groups_BxTxGxFg.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    mass_BxKx1 = jnp.sum(weight_BxTxGxK, axis=(1, 2))[:, :, None]
    vlad_BxKxFg = weighted_BxKxFg - mass_BxKx1 * centres_KxFg[None]
    vlad_BxKxFg = l2_normalize(vlad_BxKxFg, axis=-1)  # Intra-normalization, per cluster.
    return l2_normalize(vlad_BxKxFg.reshape(B, K * Fg), axis=-1)
