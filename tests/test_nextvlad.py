"""NeXtVLAD against a NumPy loop over frames, groups and clusters; invariance to padding."""

import functools

import jax
import numpy as np
import pytest

from mfb_jax import nextvlad
from mfb_jax.errors import ConfigError

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T, F = 3, 6, 4
LENGTHS = (6, 2, 1)  # Valid frames per video; the rest is padding.
K, LAMBDA, G = 3, 3, 2  # Clusters, expansion, groups: group size 3 * 4 / 2 = 6.


def make_inputs(num_frames: int = T, seed: int = 0):
  """Frames with large garbage in the padded positions."""
  rng = np.random.default_rng(seed)
  x_BxTxF = rng.normal(size=(B, num_frames, F)).astype(np.float32)
  mask_BxT = np.zeros((B, num_frames), np.float32)
  for b, n in enumerate(LENGTHS):
    mask_BxT[b, :n] = 1.0
    x_BxTxF[b, n:] = rng.uniform(-60, 60, size=(num_frames - n, F))
  return x_BxTxF, mask_BxT


def init_random(module, x_BxTxF, mask_BxT, seed: int = 2):
  """Initialized variables with random (non-zero) biases, so the test sees every term."""
  variables = jax.jit(functools.partial(module.init, train=False))(
    jax.random.key(0), x_BxTxF, mask_BxT
  )
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  for name in ("expand", "attention", "assign"):
    params[name]["bias"] = rng.normal(size=params[name]["bias"].shape).astype(np.float32)
  return {"params": params}


def nextvlad_by_loops(x_BxTxF, params):
  """The NeXtVLAD equations with explicit loops over videos, valid frames, groups, clusters."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  centres = p["centres"]
  Fg = centres.shape[1]
  out = []
  for b, n in enumerate(LENGTHS):
    vlad = np.zeros((K, Fg))
    for t in range(n):
      x = x_BxTxF[b, t] @ p["expand"]["kernel"] + p["expand"]["bias"]  # lambda * F values.
      for g in range(G):
        attention = 1 / (
          1 + np.exp(-(x @ p["attention"]["kernel"][:, g] + p["attention"]["bias"][g]))
        )
        cols = [g * K + k for k in range(K)]
        scores = np.exp(x @ p["assign"]["kernel"][:, cols] + p["assign"]["bias"][cols])
        alpha = scores / scores.sum()
        piece = x[g * Fg : (g + 1) * Fg]
        for k in range(K):
          vlad[k] += attention * alpha[k] * (piece - centres[k])
    for k in range(K):
      vlad[k] /= np.linalg.norm(vlad[k])
    flat = vlad.reshape(-1)
    out.append(flat / np.linalg.norm(flat))
  return np.stack(out)


def test_nextvlad_equals_loop_over_frames_groups_and_clusters():
  x_BxTxF, mask_BxT = make_inputs()
  module = nextvlad.NeXtVLAD(num_clusters=K, expansion=LAMBDA, groups=G)
  variables = init_random(module, x_BxTxF, mask_BxT)
  out = module.apply(variables, x_BxTxF, mask_BxT)
  assert out.shape == (B, K * LAMBDA * F // G)
  expected = nextvlad_by_loops(x_BxTxF, variables["params"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_more_padding_changes_nothing(train):
  x_BxTxF, mask_BxT = make_inputs()
  module = nextvlad.NeXtVLAD(num_clusters=K, expansion=LAMBDA, groups=G)
  variables = init_random(module, x_BxTxF, mask_BxT)
  x_long, mask_long = make_inputs(num_frames=T + 5, seed=7)
  x_long[:, :T] = x_BxTxF  # Same videos; 5 more garbage frames each.
  mask_long[:, :T] = mask_BxT
  short = module.apply(variables, x_BxTxF, mask_BxT, train=train)
  long = module.apply(variables, x_long, mask_long, train=train)
  np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-6)


def test_video_without_frames_gives_zeros():
  x_BxTxF, mask_BxT = make_inputs()
  mask_BxT[1] = 0.0
  module = nextvlad.NeXtVLAD(num_clusters=K, expansion=LAMBDA, groups=G)
  out = np.asarray(module.apply(init_random(module, x_BxTxF, mask_BxT), x_BxTxF, mask_BxT))
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.isfinite(out).all()


def test_groups_must_divide_the_expanded_size():
  x_BxTxF, mask_BxT = make_inputs()
  module = nextvlad.NeXtVLAD(num_clusters=K, expansion=1, groups=3)  # 1 * 4 = 4 values.
  with pytest.raises(ConfigError, match="expansion \\* input size = 1 \\* 4 = 4 is not divisible"):
    module.init(jax.random.key(0), x_BxTxF, mask_BxT)


def test_bfloat16_matmuls_stay_close_to_float32():
  x_BxTxF, mask_BxT = make_inputs()
  module32 = nextvlad.NeXtVLAD(num_clusters=K, expansion=LAMBDA, groups=G)
  module16 = nextvlad.NeXtVLAD(num_clusters=K, expansion=LAMBDA, groups=G, dtype=jax.numpy.bfloat16)
  variables = init_random(module32, x_BxTxF, mask_BxT)
  out32 = np.asarray(module32.apply(variables, x_BxTxF, mask_BxT))
  out16 = module16.apply(variables, x_BxTxF, mask_BxT)
  assert out16.dtype == np.float32
  np.testing.assert_allclose(out16, out32, atol=3e-2)
  assert np.abs(np.asarray(out16) - out32).max() > 0  # bfloat16 really used.
