"""Analytic matmul FLOPs of the modules beyond the paper: by hand, and against the traced step.

The by-hand figures follow flops.py's rules (2nm per row forward, 2nm for the weight gradient,
2nm more for the input gradient when something upstream has parameters). The second check
counts the dot_general FLOPs in the jaxpr of the actual gradient computation, which JAX builds
without the gradients nobody needs: the two must agree exactly.
"""

import functools
import math

import jax
import numpy as np
import pytest
from conftest import dot_operand_dtypes, native_bfloat16_products

from configs import default
from mfb_jax import flops, model

jax.config.update("jax_numpy_rank_promotion", "raise")


def config_for(aggregator, fusion, frames=1, rgb=6, audio=5, classes=7, **model_fields):
  config = default.get_config()
  config.data.update(
    format="frame" if frames > 1 else "video",
    max_frames=frames,
    rgb_size=rgb,
    audio_size=audio,
    num_classes=classes,
  )
  config.model.update(aggregator=aggregator, fusion=fusion, classifier="logistic", **model_fields)
  return config


def test_mfh_by_hand():
  config = config_for("avgpool", "mfh")
  config.model.mfh.update(factor=2, output_dim=3, order=2)
  # Avgpool has no parameters: U (6 -> 6) and V (5 -> 6) need no input gradient. Two blocks.
  blocks = 2 * (2 * 6 * 6 * 2 + 2 * 5 * 6 * 2)
  head = 2 * (2 * 3) * 7 * 3  # Logistic on the 2 * o = 6 fused values, with input gradient.
  assert flops.train_flops_per_example(config) == blocks + head == 780


def test_nextvlad_by_hand():
  config = config_for("nextvlad", "concat", frames=4, rgb=4, audio=2, classes=5)
  config.model.nextvlad.update(num_clusters=3, expansion=2, groups=2)

  def by_hand(F):  # 4 frames; X = 2F expanded values, 2 groups of F, 3 clusters.
    X = 2 * F
    expand = 2 * 4 * F * X * 2  # On data: forward + weight gradient.
    attention = 2 * 4 * X * 2 * 3  # Input gradient too: the expansion has weights.
    assign = 2 * 4 * X * (2 * 3) * 3
    vlad = 3 * (2 * (4 * 2) * 3 * F)  # 8 descriptors of F values, 3 clusters; all gradients.
    return expand + attention + assign + vlad

  assert by_hand(4) == 512 + 384 + 1152 + 576
  head = 2 * (3 * 4 + 3 * 2) * 5 * 3  # Outputs K * X / G = 12 and 6, concatenated.
  assert flops.train_flops_per_example(config) == by_hand(4) + by_hand(2) + head == 4348


@pytest.mark.parametrize("aggregator, expected", [("dbof", 822), ("netvlad", 792)])
def test_frame_level_mfb_by_hand(aggregator, expected):
  config = config_for(aggregator, "mfb", frames=3, rgb=4, audio=2, classes=4, fusion_level="frame")
  config.model.frame_mfb.update(factor=2, output_dim=3)
  config.model.dbof.hidden_size = 5
  config.model.netvlad.num_clusters = 2
  per_frame_mfb = 2 * 3 * 4 * 6 * 2 + 2 * 3 * 2 * 6 * 2  # U and V on 3 frames of data.
  if aggregator == "dbof":  # The fused frames have weights upstream: input gradient too.
    aggregate, width = 2 * 3 * 3 * 5 * 3, 5
  else:
    aggregate, width = 2 * 3 * 3 * 2 * 3 + 3 * (2 * 3 * 2 * 3), 2 * 3
  head = 2 * width * 4 * 3
  assert flops.train_flops_per_example(config) == per_frame_mfb + aggregate + head == expected


@pytest.mark.parametrize("fusion, expected", [("concat", 316), ("mfb", 208)])
def test_context_gating_by_hand(fusion, expected):
  config = config_for("avgpool", fusion, rgb=3, audio=2, classes=4, context_gating=True)
  config.model.mfb.update(factor=1, output_dim=2)
  if fusion == "concat":  # Nothing upstream has weights: the first gate needs no input gradient.
    fuse, fused_gate, width = 0, 2 * 5 * 5 * 2, 5
  else:
    fuse, fused_gate, width = 2 * 3 * 2 * 2 + 2 * 2 * 2 * 2, 2 * 2 * 2 * 3, 2
  head = 2 * width * 4 * 3
  output_gate = 2 * 4 * 4 * 3  # C x C on the probabilities.
  total = fuse + fused_gate + head + output_gate
  assert flops.train_flops_per_example(config) == total == expected


def _subjaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def dot_flops(jaxpr) -> int:
  """2 * (output size) * (contracted size) summed over every dot_general, nested ones too."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in contract)
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        total += dot_flops(sub)
  return total


@pytest.mark.parametrize(
  "aggregator, fusion, fields",
  [
    ("netvlad", "mfb", {}),  # The paper's cells check the counting method itself.
    ("dbof", "mfb", {}),
    ("avgpool", "concat", {}),  # Nothing has weights before the head.
    ("nextvlad", "mfh", {"context_gating": True}),
    ("dbof", "mfb", {"fusion_level": "frame"}),
    ("netvlad", "mfb", {"fusion_level": "frame", "context_gating": True}),
    ("nextvlad", "mfb", {"fusion_level": "frame"}),
  ],
)
def test_formula_equals_the_matmuls_of_the_traced_gradient(aggregator, fusion, fields):
  config = config_for(aggregator, fusion, frames=3, rgb=8, audio=4, classes=5, **fields)
  config.model.update(classifier="moe")
  config.model.mfb.update(factor=2, output_dim=4)
  config.model.mfh.update(factor=2, output_dim=4)
  config.model.frame_mfb.update(factor=2, output_dim=4)
  config.model.dbof.hidden_size = 6
  # The formula counts the standard gradient; the fused one (dbof_pool.py) does fewer matmuls,
  # and the traced hand-written NetVLAD gradient (netvlad_pool.py) still holds the input
  # gradient that XLA drops when the frames are data.
  config.model.dbof.fused_gradient = False
  config.model.netvlad.hand_written_gradient = False
  config.model.netvlad.num_clusters = 3
  config.model.nextvlad.update(num_clusters=3, expansion=2, groups=2)
  net = model.build_model(config)
  B = 2
  inputs = model.input_shapes(config, B, 3)
  # Shapes only: tracing needs no values.
  variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), *inputs)

  def loss(params, batch_stats, rgb, audio, mask):
    probs, _ = net.apply(
      {"params": params, "batch_stats": batch_stats},
      rgb,
      audio,
      mask,
      train=True,
      rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats", "losses"],
    )
    return probs.sum()

  batch_stats = variables.get("batch_stats", {})
  traced = jax.make_jaxpr(jax.grad(loss))(variables["params"], batch_stats, *inputs)
  assert dot_flops(traced.jaxpr) == B * flops.train_flops_per_example(config)


def test_head_without_weights_before_it_needs_no_input_gradient():
  config = config_for("avgpool", "concat")  # 6 + 5 = 11 inputs, 7 classes, logistic.
  assert flops.train_flops_per_example(config) == 2 * 11 * 7 * 2
  config.model.fusion = "fc_concat"
  config.model.fc_concat.hidden_size = 3
  fc = 2 * 6 * 3 * 2 + 2 * 5 * 3 * 2
  assert flops.train_flops_per_example(config) == fc + 2 * (2 * 3) * 7 * 3


@pytest.mark.parametrize("backend, size", [("cpu", 2048), ("gpu", 8192), ("tpu", 8192)])
def test_matmul_peak_uses_large_products_on_accelerators(monkeypatch, backend, size):
  """A 2048 product takes tens of microseconds on a GPU: the peak is measured on 8192 there."""
  shapes = []

  class MeasuredError(Exception):
    pass

  def record_shape(key, shape, dtype):
    shapes.append(shape)
    raise MeasuredError

  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax.random, "normal", record_shape)
  with pytest.raises(MeasuredError):
    flops.measure_matmul_peak()
  assert shapes == [(size, size)]


def test_the_bfloat16_peak_is_measured_on_the_native_product():
  """bf16 x bf16 -> float32, the form the layers use (XLA:CPU widens a bf16-result product, so
  `x @ y` in bf16 would measure the float32 peak on AMX)."""
  a = jax.numpy.ones((64, 64), jax.numpy.bfloat16)
  assert flops.peak_product("bfloat16")(a, a).dtype == jax.numpy.float32
  hlo = flops.peak_product("bfloat16").lower(a, a).compile().as_text()
  if native_bfloat16_products():
    assert dot_operand_dtypes(hlo) == [("bf16", "bf16")]
  f32 = a.astype(jax.numpy.float32)
  np.testing.assert_array_equal(flops.peak_product("float32")(f32, f32), f32 @ f32)


@pytest.mark.parametrize(
  "cell, mflops, floor",
  [("netvlad,mfb", 367.3, 572), ("dbof,mfb", 2981.8, 70)],
)
def test_flop_floor_matches_the_design_figures(cell, mflops, floor):
  from configs import paper

  config = paper.get_config(cell)
  per_example = flops.train_flops_per_example(config)
  assert per_example / 1e6 == pytest.approx(mflops, rel=1e-3)
  assert 210e9 / per_example == pytest.approx(floor, rel=1e-2)  # The design figures are rounded.
