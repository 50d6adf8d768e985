"""Aggregators against NumPy formulas written frame by frame, and invariance to padding."""

import functools

import jax
import numpy as np
import pytest
from conftest import mostly_not_bfloat16_valued

from mfb_jax import aggregation

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T, F = 3, 7, 6
LENGTHS = (7, 3, 1)  # Valid frames per video; the rest is padding.


def make_inputs(seed: int = 0, num_frames: int = T):
  """Frames with random garbage (large values) in the padded positions."""
  rng = np.random.default_rng(seed)
  x_BxTxF = rng.normal(size=(B, num_frames, F)).astype(np.float32)
  mask_BxT = np.zeros((B, num_frames), np.float32)
  for b, n in enumerate(LENGTHS):
    mask_BxT[b, :n] = 1.0
    x_BxTxF[b, n:] = rng.uniform(-50, 50, size=(num_frames - n, F))
  return x_BxTxF, mask_BxT


def pad_more(x_BxTxF, mask_BxT, extra: int, seed: int = 1):
  """The same videos with `extra` more padded frames full of garbage."""
  rng = np.random.default_rng(seed)
  garbage = rng.uniform(-80, 80, size=(B, extra, F)).astype(np.float32)
  x_long = np.concatenate([x_BxTxF, garbage], axis=1)
  mask_long = np.concatenate([mask_BxT, np.zeros((B, extra), np.float32)], axis=1)
  return x_long, mask_long


def init(module, x_BxTxF, mask_BxT):
  # Jitted: one compile is faster than running init's many ops one by one.
  return jax.jit(functools.partial(module.init, train=False))(jax.random.key(0), x_BxTxF, mask_BxT)


def randomize_bn(variables, seed: int = 3):
  """Non-trivial BatchNorm scale/bias and running stats, so the test sees their effect."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables["params"])
  H = params["bn"]["scale"].shape[0]
  params["bn"]["scale"] = rng.uniform(0.5, 2.0, H).astype(np.float32)
  params["bn"]["bias"] = rng.normal(size=H).astype(np.float32)
  stats = {
    "bn": {
      "mean": rng.normal(size=H).astype(np.float32),
      "var": rng.uniform(0.5, 3.0, H).astype(np.float32),
    }
  }
  return {"params": params, "batch_stats": stats}


def test_avgpool_equals_mean_over_unpadded_video():
  x_BxTxF, mask_BxT = make_inputs()
  module = aggregation.AvgPool()
  out = module.apply({}, x_BxTxF, mask_BxT)
  expected = np.stack([x_BxTxF[b, :n].mean(axis=0) for b, n in enumerate(LENGTHS)])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_avgpool_video_without_frames_gives_zeros():
  x_BxTxF, mask_BxT = make_inputs()
  mask_BxT[1] = 0.0
  out = aggregation.AvgPool().apply({}, x_BxTxF, mask_BxT)
  np.testing.assert_array_equal(out[1], np.zeros(F, np.float32))


def netvlad_by_loops(x_BxTxF, params):
  """NetVLAD written with explicit loops over videos, clusters and valid frames."""
  w_FxK = np.asarray(params["assign"]["kernel"], np.float64)
  b_K = np.asarray(params["assign"]["bias"], np.float64)
  centres_KxF = np.asarray(params["centres"], np.float64)
  K = centres_KxF.shape[0]
  out = []
  for b, n in enumerate(LENGTHS):
    vlad = np.zeros((K, F))
    for t in range(n):
      h = x_BxTxF[b, t].astype(np.float64)
      scores = np.exp(h @ w_FxK + b_K)
      alpha = scores / scores.sum()
      for k in range(K):
        vlad[k] += alpha[k] * (h - centres_KxF[k])
    for k in range(K):
      vlad[k] /= np.sqrt(np.sum(vlad[k] ** 2))
    flat = vlad.reshape(-1)
    out.append(flat / np.linalg.norm(flat))
  return np.stack(out)


@pytest.mark.parametrize("hand_written_gradient", [True, False])
def test_netvlad_equals_loop_over_frames_and_clusters(hand_written_gradient):
  x_BxTxF, mask_BxT = make_inputs()
  module = aggregation.NetVLAD(num_clusters=4, hand_written_gradient=hand_written_gradient)
  variables = init(module, x_BxTxF, mask_BxT)
  # Non-zero assignment bias so that the bias term is exercised.
  params = jax.tree.map(np.asarray, variables["params"])
  params["assign"]["bias"] = np.array([0.5, -1.0, 0.2, 1.5], np.float32)
  out = module.apply({"params": params}, x_BxTxF, mask_BxT)
  assert out.shape == (B, 4 * F)
  np.testing.assert_allclose(out, netvlad_by_loops(x_BxTxF, params), rtol=1e-4, atol=1e-5)


def test_netvlad_hand_written_gradient_equals_autodiff():
  """Same variables (so checkpoints), outputs and parameter gradients with either option."""
  x_BxTxF, mask_BxT = make_inputs()
  fast, plain = (aggregation.NetVLAD(3, hand_written_gradient=h) for h in (True, False))
  variables = init(fast, x_BxTxF, mask_BxT)
  plain_variables = init(plain, x_BxTxF, mask_BxT)
  assert jax.tree.structure(plain_variables) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, plain_variables, variables)  # Same init values.
  params = jax.tree.map(np.asarray, variables["params"])
  params["assign"]["bias"] = np.array([0.5, -1.0, 0.2], np.float32)
  weights = np.random.default_rng(3).normal(size=(B, 3 * F)).astype(np.float32)

  def loss(module, params):
    out = module.apply({"params": params}, x_BxTxF, mask_BxT, train=True)
    return jax.numpy.sum(out * weights)

  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
  close(loss(fast, params), loss(plain, params))
  jax.tree.map(
    close,
    jax.grad(functools.partial(loss, fast))(params),
    jax.grad(functools.partial(loss, plain))(params),
  )


def test_netvlad_never_narrows_the_frames():
  """bfloat16 NetVLAD on float32 frames computes its per-frame products in float32 (equal to the
  float32 module); on bfloat16 frames it keeps them in bfloat16 (a bf16-rounded result)."""
  x_BxTxF, mask_BxT = make_inputs()
  wide, narrow = (aggregation.NetVLAD(3, dtype=d) for d in (jax.numpy.float32, jax.numpy.bfloat16))
  variables = init(wide, x_BxTxF, mask_BxT)
  want = wide.apply(variables, x_BxTxF, mask_BxT)
  np.testing.assert_array_equal(narrow.apply(variables, x_BxTxF, mask_BxT), want)
  x16 = jax.numpy.asarray(x_BxTxF, jax.numpy.bfloat16)
  got16 = narrow.apply(variables, x16, mask_BxT)
  assert np.max(np.abs(got16 - wide.apply(variables, x16.astype(np.float32), mask_BxT))) > 0
  np.testing.assert_allclose(got16, want, atol=3e-2)


def dbof_by_hand(x_BxTxF, params, mean_H, var_H):
  """fc -> BatchNorm(mean_H, var_H) -> ReLU -> max over each video's valid frames."""
  w_FxH = np.asarray(params["fc"]["kernel"], np.float64)
  scale, bias = params["bn"]["scale"], params["bn"]["bias"]
  out = []
  for b, n in enumerate(LENGTHS):
    h_nxH = x_BxTxF[b, :n].astype(np.float64) @ w_FxH
    normed = (h_nxH - mean_H) / np.sqrt(var_H + 1e-3) * scale + bias
    out.append(np.maximum(normed, 0.0).max(axis=0))
  return np.stack(out)


def valid_frames(x_BxTxF):
  return np.concatenate([x_BxTxF[b, :n] for b, n in enumerate(LENGTHS)]).astype(np.float64)


def test_dbof_train_uses_batch_stats_of_valid_frames_only():
  x_BxTxF, mask_BxT = make_inputs()
  module = aggregation.DBoF(hidden_size=5)
  variables = randomize_bn(init(module, x_BxTxF, mask_BxT))
  out, updates = module.apply(variables, x_BxTxF, mask_BxT, train=True, mutable=["batch_stats"])
  h_VxH = valid_frames(x_BxTxF) @ np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  mean_H, var_H = h_VxH.mean(axis=0), h_VxH.var(axis=0)  # Biased variance, as flax.
  expected = dbof_by_hand(x_BxTxF, variables["params"], mean_H, var_H)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  old = variables["batch_stats"]["bn"]
  new = updates["batch_stats"]["bn"]
  np.testing.assert_allclose(new["mean"], 0.99 * old["mean"] + 0.01 * mean_H, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.99 * old["var"] + 0.01 * var_H, rtol=1e-5, atol=1e-5)


def test_dbof_eval_uses_running_stats():
  x_BxTxF, mask_BxT = make_inputs()
  module = aggregation.DBoF(hidden_size=5)
  variables = randomize_bn(init(module, x_BxTxF, mask_BxT))
  out = module.apply(variables, x_BxTxF, mask_BxT, train=False)
  stats = variables["batch_stats"]["bn"]
  expected = dbof_by_hand(x_BxTxF, variables["params"], stats["mean"], stats["var"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_dbof_fused_gradient_equals_the_plain_flax_layers():
  """Same variables, outputs, running statistics and gradients, with scales of both signs."""
  x_BxTxF, mask_BxT = make_inputs()
  fused, plain = aggregation.DBoF(hidden_size=5), aggregation.DBoF(5, fused_gradient=False)
  variables = randomize_bn(init(fused, x_BxTxF, mask_BxT))
  variables["params"]["bn"]["scale"] = variables["params"]["bn"]["scale"] * np.array(
    [1, -1, 1, -1, 1], np.float32
  )
  shapes = lambda v: jax.tree.map(np.shape, v)
  assert shapes(init(plain, x_BxTxF, mask_BxT)) == shapes(variables)

  def loss(module, params):
    out, updates = module.apply(
      {**variables, "params": params}, x_BxTxF, mask_BxT, train=True, mutable=["batch_stats"]
    )
    weights = np.arange(out.size, dtype=np.float32).reshape(out.shape) / out.size
    return jax.numpy.sum(out * weights), (out, updates)

  (_, (out_f, upd_f)), grad_f = jax.value_and_grad(functools.partial(loss, fused), has_aux=True)(
    variables["params"]
  )
  (_, (out_p, upd_p)), grad_p = jax.value_and_grad(functools.partial(loss, plain), has_aux=True)(
    variables["params"]
  )
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  close(out_f, out_p)
  jax.tree.map(close, upd_f, upd_p)
  jax.tree.map(close, grad_f, grad_p)
  evals = [m.apply(variables, x_BxTxF, mask_BxT, train=False) for m in (fused, plain)]
  close(*evals)


def test_dbof_plain_layers_keep_every_max_gradient_when_jitted():
  """jnp.max's gradient finds the max's frame by comparing values, which XLA recomputed with
  other rounding under jit: here 7 of 61 (video, unit) pairs lost theirs (the fc kernel's
  gradient was 17% off). The plain layers now take the max as a gather at the argmax."""
  rng = np.random.default_rng(0)
  lengths = np.array([9, 1, 5, 9, 2, 7])
  mask_BxT = (np.arange(9)[None] < lengths[:, None]).astype(np.float32)
  x_BxTxF = (rng.integers(0, 256, (6, 9, 16)) * 4 / 255 - 2).astype(np.float32)
  x_BxTxF *= mask_BxT[:, :, None]
  weights_BxH = rng.standard_normal((6, 12)).astype(np.float32)
  fused, plain = aggregation.DBoF(hidden_size=12), aggregation.DBoF(12, fused_gradient=False)
  variables = init(fused, x_BxTxF, mask_BxT)

  params = variables["params"]

  def kernel_grad(module):  # The BatchNorm's parameters as constants, as in the failing case.
    def loss(kernel_FxH):
      at = {**variables, "params": {**params, "fc": {"kernel": kernel_FxH}}}
      out, _ = module.apply(at, x_BxTxF, mask_BxT, train=True, mutable=["batch_stats"])
      return jax.numpy.sum(out * weights_BxH)

    return jax.jit(jax.grad(loss))(params["fc"]["kernel"])

  np.testing.assert_allclose(kernel_grad(plain), kernel_grad(fused), rtol=1e-4, atol=1e-5)


AGGREGATORS = {
  "avgpool": aggregation.AvgPool(),
  "dbof": aggregation.DBoF(hidden_size=5),
  "netvlad": aggregation.NetVLAD(num_clusters=3),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_more_padding_changes_nothing(name, train):
  module = AGGREGATORS[name]
  x_BxTxF, mask_BxT = make_inputs()
  variables = init(module, x_BxTxF, mask_BxT)
  if "batch_stats" in variables:
    variables = randomize_bn(variables)
  x_long, mask_long = pad_more(x_BxTxF, mask_BxT, extra=5)

  def run(x, mask):
    # mutable=True returns (output, updates) also for modules without batch stats.
    out, updates = module.apply(variables, x, mask, train=train, mutable=True)
    return np.asarray(out), updates

  short, short_updates = run(x_BxTxF, mask_BxT)
  long, long_updates = run(x_long, mask_long)
  np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-6)
  # Running statistics too: padded frames never enter them.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), short_updates, long_updates
  )


@pytest.mark.parametrize("name", ["dbof", "netvlad"])
def test_frame_aggregators_see_more_than_the_mean_frame(name):
  """Two videos with the same mean frame but different frames must give different outputs."""
  module = AGGREGATORS[name]
  rng = np.random.default_rng(5)
  frames_TxF = rng.normal(size=(4, F)).astype(np.float32)
  mean_F = frames_TxF.mean(axis=0)
  x_2xTxF = np.stack([frames_TxF, np.tile(mean_F, (4, 1))])
  mask_2xT = np.ones((2, 4), np.float32)
  variables = init(module, x_2xTxF, mask_2xT)
  if "batch_stats" in variables:
    variables = randomize_bn(variables)
  out = module.apply(variables, x_2xTxF, mask_2xT, train=False)
  assert np.abs(out[0] - out[1]).max() > 1e-2


def test_avgpool_sums_bfloat16_frames_in_float32():
  """bfloat16 frames (a bfloat16 model's batches) are averaged in float32: the mean of the
  bfloat16 values, not a bfloat16 running sum."""
  x_BxTxF, mask_BxT = make_inputs()
  x16 = jax.numpy.asarray(x_BxTxF + 100.0, jax.numpy.bfloat16)  # A large offset: bf16 sums drift.
  x64 = np.asarray(x16, np.float64)
  expected = np.stack([x64[b, :n].mean(axis=0) for b, n in enumerate(LENGTHS)])
  for mask in (mask_BxT, mask_BxT.astype(jax.numpy.bfloat16)):
    out = aggregation.AvgPool().apply({}, x16, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize(
  "module, kernel",
  [
    (aggregation.DBoF(hidden_size=5, dtype=jax.numpy.bfloat16), ("fc", "kernel")),
    (aggregation.NetVLAD(3, dtype=jax.numpy.bfloat16), ("assign", "kernel")),
  ],
)
def test_bfloat16_aggregators_give_their_kernels_float32_gradients(module, kernel):
  """On bfloat16 frames (a bfloat16 model's batches) the fused layers cast their float32 kernel
  inside the hand-written gradient: the kernel's gradient is the float32 accumulation, never
  rounded to bfloat16 (as a cast before the layer made it) on its way to Adam."""
  x_BxTxF, mask_BxT = make_inputs()
  x16 = jax.numpy.asarray(x_BxTxF, jax.numpy.bfloat16)
  variables = init(module, x16, mask_BxT)
  cotangent = np.random.default_rng(5).normal(size=(B, 5 if kernel[0] == "fc" else 3 * F))

  def loss(params):
    out, _ = module.apply(
      {**variables, "params": params}, x16, mask_BxT, train=True, mutable=["batch_stats"]
    )
    return jax.numpy.sum(out * cotangent)

  grad = jax.jit(jax.grad(loss))(variables["params"])[kernel[0]][kernel[1]]
  assert grad.dtype == jax.numpy.float32
  assert mostly_not_bfloat16_valued(grad)
