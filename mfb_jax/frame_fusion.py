"""Frame-level MFB (the paper's future work): fuse rgb and audio per frame, then aggregate.

The video-level model (the paper) aggregates each modality over time and fuses the two video
vectors once. Here every frame t is fused first,

  z_t = L2(ReLU(SumPool_k((U^T rgb_t) * (V^T audio_t))))      (o values, unit norm)

and the sequence z_1..z_T is then aggregated (avgpool, dbof, netvlad or nextvlad, honouring the
mask) into one vector for the classifier. Design choices:

- o is smaller than at video level (configs/default.py: o=256, k=4): U and V now run on every
  frame, so their cost is T times that of video-level MFB.
- Per frame: ReLU and L2 exactly as video-level MFB, so each fused frame has unit norm (padded
  frames included, which keeps garbage bounded; the aggregator ignores them anyway). Nothing is
  normalized after the aggregator beyond what the aggregator itself does.
- Dropout (rate `dropout`) is applied to the aggregated vector, not per frame: it then sits where
  the video-level model's MFB dropout sits (just before the classifier), and its random mask does
  not depend on the padded length, so adding padding changes nothing in training either.

Called as `frame_mfb(rgb_BxTxD, audio_BxTxA, mask_BxT, train=bool) -> vec_BxG`.
Shape letters: B batch, T frames, D rgb size, A audio size, N = B*T, O fused frame size,
G aggregated size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfb_jax import fusion

Dtype = Any


class FrameMFB(nn.Module):
  """MFB on every frame (no dropout there), the given aggregator over the fused frames, dropout."""

  aggregator: nn.Module  # Any registered aggregator; it receives the fused frames and the mask.
  factor: int = 4  # k per frame.
  output_dim: int = 256  # o per frame: the aggregator's input size.
  dropout: float = 0.1  # On the aggregated vector.
  dtype: Dtype = jnp.float32  # Matmul dtype; products and normalizations run in float32.

  @nn.compact
  def __call__(
    self, rgb_BxTxD: jax.Array, audio_BxTxA: jax.Array, mask_BxT: jax.Array, train: bool = False
  ) -> jax.Array:
    B, T, D = rgb_BxTxD.shape
    A = audio_BxTxA.shape[-1]
    mfb = fusion.MFB(
      factor=self.factor, output_dim=self.output_dim, dropout=0.0, dtype=self.dtype, name="mfb"
    )
    # Frames as rows: one 2-D (B*T, D) matmul per projection, as DBoF's fc.
    fused_NxO = mfb(rgb_BxTxD.reshape(B * T, D), audio_BxTxA.reshape(B * T, A), train=train)
    fused_BxTxO = fused_NxO.reshape(B, T, self.output_dim)
    video_BxG = self.aggregator(fused_BxTxO, mask_BxT, train=train)
    return fusion.dropout(self, video_BxG, self.dropout, train)
