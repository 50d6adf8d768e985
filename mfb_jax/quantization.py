"""YouTube-8M's 8-bit features: q in 0..255 stands for q * 4/255 - 2.

That is the starter code's dequantization without its 4/512 bias. Kept apart from records.py
(TensorFlow) so that what needs only the numbers, such as the bench mode's in-memory batches,
runs without TensorFlow.
"""

import numpy as np

QUANT_SCALE = 4.0 / 255.0
QUANT_OFFSET = -2.0


def dequantize(q: np.ndarray, dtype=np.float32) -> np.ndarray:
  """q * 4/255 - 2, computed in float32 and stored as `dtype`."""
  return (q.astype(np.float32) * QUANT_SCALE + QUANT_OFFSET).astype(dtype)
