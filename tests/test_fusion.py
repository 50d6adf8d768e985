"""Fusions against hand formulas: MFB as sum_i l^T U_i V_i^T a per output, FC+concat by hand."""

import functools

import jax
import numpy as np
import pytest

from mfb_jax import fusion

jax.config.update("jax_numpy_rank_promotion", "raise")

B, V, A = 3, 6, 5  # Batch, aggregated video size, aggregated audio size.
K_FACTOR, OUT = 3, 4  # MFB's k and o.


def make_vectors(seed: int = 0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, V)).astype(np.float32), rng.normal(size=(B, A)).astype(np.float32)


def init(module, video_BxV, audio_BxA):
  # Jitted: one compile is faster than running init's many ops one by one.
  return jax.jit(functools.partial(module.init, train=False))(
    jax.random.key(0), video_BxV, audio_BxA
  )


def with_random_biases(variables, seed: int = 1):
  """Dense biases start at zero; random ones make the test see the bias terms."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  for layer in params.values():
    layer["bias"] = rng.normal(size=layer["bias"].shape).astype(np.float32)
  return {"params": params}


def mfb_bilinear_by_hand(l_BxV, a_BxA, params):
  """f_j = sum over i in group j of (U_i^T l + bu_i)(V_i^T a + bv_i), expanded term by term."""
  U, bu = params["U"]["kernel"].astype(np.float64), params["U"]["bias"].astype(np.float64)
  Vm, bv = params["V"]["kernel"].astype(np.float64), params["V"]["bias"].astype(np.float64)
  out = np.zeros((B, OUT))
  for b in range(B):
    video, audio = l_BxV[b].astype(np.float64), a_BxA[b].astype(np.float64)
    for j in range(OUT):
      group = range(j * K_FACTOR, (j + 1) * K_FACTOR)
      W_j = sum(np.outer(U[:, i], Vm[:, i]) for i in group)  # Rank-k bilinear form.
      out[b, j] = (
        video @ W_j @ audio
        + sum(bu[i] * (Vm[:, i] @ audio) for i in group)
        + sum(bv[i] * (U[:, i] @ video) for i in group)
        + sum(bu[i] * bv[i] for i in group)
      )
  return out


def test_mfb_bilinear_matches_low_rank_formula_and_output_is_unit_norm():
  l_BxV, a_BxA = make_vectors()
  module = fusion.MFB(factor=K_FACTOR, output_dim=OUT, dropout=0.1)
  variables = with_random_biases(init(module, l_BxV, a_BxA))
  out, state = module.apply(variables, l_BxV, a_BxA, train=False, mutable=["intermediates"])
  (bilinear,) = state["intermediates"]["bilinear_BxO"]
  expected = mfb_bilinear_by_hand(l_BxV, a_BxA, variables["params"])
  np.testing.assert_allclose(bilinear, expected, rtol=1e-4, atol=1e-4)
  relu = np.maximum(expected, 0.0)
  assert (relu.sum(axis=1) > 0).all(), "test needs a non-zero case per row"
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    out, relu / np.linalg.norm(relu, axis=1, keepdims=True), rtol=1e-4, atol=1e-5
  )


def test_mfb_output_scale_multiplies_the_unit_vector():
  l_BxV, a_BxA = make_vectors()
  plain = fusion.MFB(factor=K_FACTOR, output_dim=OUT, dropout=0.1)
  scaled = fusion.MFB(factor=K_FACTOR, output_dim=OUT, dropout=0.1, output_scale=8.0)
  variables = with_random_biases(init(plain, l_BxV, a_BxA))
  unit = plain.apply(variables, l_BxV, a_BxA, train=False)
  out = scaled.apply(variables, l_BxV, a_BxA, train=False)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 8.0, rtol=1e-5)
  np.testing.assert_allclose(out, 8.0 * np.asarray(unit), rtol=1e-6)


def test_mfb_dropout_only_in_training():
  l_BxV, a_BxA = make_vectors()
  module = fusion.MFB(factor=K_FACTOR, output_dim=64, dropout=0.5)
  variables = init(module, l_BxV, a_BxA)

  def run(train, seed):
    return np.asarray(
      module.apply(variables, l_BxV, a_BxA, train=train, rngs={"dropout": jax.random.key(seed)})
    )

  clean = run(False, 1)
  np.testing.assert_array_equal(clean, run(False, 2))
  dropped = run(True, 1)
  kept = dropped != 0
  assert 0 < (~kept & (clean != 0)).sum(), "dropout zeroed nothing at rate 0.5"
  np.testing.assert_allclose(dropped[kept], clean[kept] / 0.5, rtol=1e-6)


def test_fc_concat_by_hand_and_sized_like_mfb():
  l_BxV, a_BxA = make_vectors()
  module = fusion.FcConcat(hidden_size=K_FACTOR * OUT)
  variables = with_random_biases(init(module, l_BxV, a_BxA))
  out = module.apply(variables, l_BxV, a_BxA)
  p = variables["params"]
  video = l_BxV @ p["video_fc"]["kernel"] + p["video_fc"]["bias"]
  audio = a_BxA @ p["audio_fc"]["kernel"] + p["audio_fc"]["bias"]
  np.testing.assert_allclose(out, np.hstack([video, audio]), rtol=1e-5, atol=1e-5)
  # "The same parameter settings as MFB": FC layers as large as MFB's U and V.
  mfb_vars = init(fusion.MFB(factor=K_FACTOR, output_dim=OUT), l_BxV, a_BxA)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(variables) == count(mfb_vars) == (V + 1 + A + 1) * K_FACTOR * OUT


@pytest.mark.parametrize(
  "module, expected",
  [
    (fusion.AudioOnly(), lambda v, a: a),
    (fusion.VideoOnly(), lambda v, a: v),
    (fusion.Concat(), lambda v, a: np.hstack([v, a])),
  ],
)
def test_parameter_free_fusions(module, expected):
  l_BxV, a_BxA = make_vectors()
  out = module.apply({}, l_BxV, a_BxA)
  np.testing.assert_array_equal(out, expected(l_BxV, a_BxA))


def test_single_modality_fusions_declare_what_they_read():
  assert fusion.AudioOnly.modalities == ("audio",)
  assert fusion.VideoOnly.modalities == ("video",)
  assert not hasattr(fusion.MFB, "modalities")  # Reads both (the model's default).
