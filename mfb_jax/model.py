"""The model zoo: registries and `build_model(config)` = aggregation -> fusion -> classifier.

Each registry maps a config name to a Flax linen class; `config.model.<name>` (if present) holds
that class's keyword arguments. Adding a module = one class + one dict entry.
`config.model.fusion_level='frame'` fuses every frame first and then aggregates (FRAME_FUSIONS,
settings in `config.model.frame_<name>`); `config.model.context_gating` adds context gating after
the fusion and on the probabilities; `config.model.normalize_frames` scales each frame's
[rgb; audio] to unit length first (`unit_frames`, the starter code's input normalization).

Shape letters: B batch, T frames, D rgb size, A audio size, V and G the aggregated rgb and audio
sizes, O fused size, C classes.

  python -m mfb_jax.model --count             # parameter counts of the paper's 15 models
  python -m mfb_jax.model --count --beyond    # and of the models beyond the paper
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mfb_jax import (
  aggregation,
  classifier,
  cli,
  frame_fusion,
  fusion,
  gating,
  mfh,
  module_config,
  nextvlad,
)
from mfb_jax.errors import ConfigError

AGGREGATORS = {
  "avgpool": aggregation.AvgPool,
  "dbof": aggregation.DBoF,
  "netvlad": aggregation.NetVLAD,
  "nextvlad": nextvlad.NeXtVLAD,
}
FUSIONS = {
  "audio": fusion.AudioOnly,
  "video": fusion.VideoOnly,
  "concat": fusion.Concat,
  "fc_concat": fusion.FcConcat,
  "mfb": fusion.MFB,
  "mfh": mfh.MFH,
}
# Fusions of single frames (config.model.fusion_level='frame'), by config.model.fusion; their
# settings live in config.model.frame_<name>.
FRAME_FUSIONS = {
  "mfb": frame_fusion.FrameMFB,
}
FUSION_LEVELS = ("video", "frame")
CLASSIFIERS = {
  "moe": classifier.MoE,
  "logistic": classifier.Logistic,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def module_sections() -> dict[str, type]:
  """Each registered module's config.model section name -> its class."""
  frame = {f"frame_{name}": cls for name, cls in FRAME_FUSIONS.items()}
  return {**AGGREGATORS, **FUSIONS, **CLASSIFIERS, **frame}


def unit_frames(rgb_BxTxD: jax.Array, audio_BxTxA: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each frame's [rgb; audio] scaled to unit L2 norm, as the starter code's
  tf.nn.l2_normalize(x, -1) (x / sqrt(max(sum(x^2), 1e-12))); all-zero (padded) frames stay 0."""
  f32 = jnp.float32
  sum_BxTx1 = jnp.sum(jnp.square(rgb_BxTxD.astype(f32)), -1, keepdims=True)
  sum_BxTx1 += jnp.sum(jnp.square(audio_BxTxA.astype(f32)), -1, keepdims=True)
  scale_BxTx1 = jax.lax.rsqrt(jnp.maximum(sum_BxTx1, 1e-12))
  return (
    (rgb_BxTxD.astype(f32) * scale_BxTx1).astype(rgb_BxTxD.dtype),
    (audio_BxTxA.astype(f32) * scale_BxTx1).astype(audio_BxTxA.dtype),
  )


def classify(module: nn.Module, fused_BxO: jax.Array, train: bool) -> jax.Array:
  """The classifier, with context gating before and after it where the module has gates."""
  if module.fusion_gate is not None:
    fused_BxO = module.fusion_gate(fused_BxO)
  probs_BxC = module.classifier(fused_BxO, train=train).astype(jnp.float32)
  if module.output_gate is not None:
    probs_BxC = module.output_gate(probs_BxC)
  return probs_BxC


class VideoClassifier(nn.Module):
  """Per-modality aggregation -> fusion -> classifier; returns probs_BxC in [0, 1] (float32)."""

  rgb_aggregator: nn.Module | None  # None when the fusion does not read the video vector.
  audio_aggregator: nn.Module | None  # None when the fusion does not read the audio vector.
  fusion: nn.Module
  classifier: nn.Module
  fusion_gate: nn.Module | None = None  # Context gating of the fused vector.
  output_gate: nn.Module | None = None  # Context gating of the probabilities.
  normalize_frames: bool = False  # unit_frames first (config.model.normalize_frames).

  @nn.compact
  def __call__(
    self,
    rgb_BxTxD: jax.Array,
    audio_BxTxA: jax.Array,
    mask_BxT: jax.Array,
    train: bool = False,
  ) -> jax.Array:
    if self.normalize_frames:
      rgb_BxTxD, audio_BxTxA = unit_frames(rgb_BxTxD, audio_BxTxA)
    video_BxV = audio_BxG = None
    B = rgb_BxTxD.shape[0]
    if self.rgb_aggregator is not None:
      video_BxV = self.rgb_aggregator(rgb_BxTxD, mask_BxT, train=train)
      check_output("aggregator", self.rgb_aggregator, video_BxV, B)
    if self.audio_aggregator is not None:
      audio_BxG = self.audio_aggregator(audio_BxTxA, mask_BxT, train=train)
      check_output("aggregator", self.audio_aggregator, audio_BxG, B)
    fused_BxO = self.fusion(video_BxV, audio_BxG, train=train)
    check_output("fusion", self.fusion, fused_BxO, B)
    return classify(self, fused_BxO, train)


def check_output(kind: str, module: nn.Module, out, batch_size: int) -> None:
  """ConfigError (at init, one line) unless a module gave one vector per video, [B, size]: an
  aggregator that kept its frames, or a fusion that gave a [B, 1, O] block, failed deep in the
  loss, or (the classifier flattening it) trained on without a word."""
  shape = getattr(out, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != batch_size:
    got = f"shape {tuple(shape)}" if shape is not None else type(out).__name__
    raise ConfigError(
      f"{kind} {type(module).__name__} returned {got} for a batch of {batch_size}; it must "
      "return one vector per video, [batch, size]"
    )


class FrameFusionClassifier(nn.Module):
  """Per-frame fusion + aggregation (one module) -> classifier; returns probs_BxC in [0, 1]."""

  fusion: nn.Module  # Called as fusion(rgb_BxTxD, audio_BxTxA, mask_BxT, train) -> vec_BxO.
  classifier: nn.Module
  fusion_gate: nn.Module | None = None
  output_gate: nn.Module | None = None
  normalize_frames: bool = False

  @nn.compact
  def __call__(
    self,
    rgb_BxTxD: jax.Array,
    audio_BxTxA: jax.Array,
    mask_BxT: jax.Array,
    train: bool = False,
  ) -> jax.Array:
    if self.normalize_frames:
      rgb_BxTxD, audio_BxTxA = unit_frames(rgb_BxTxD, audio_BxTxA)
    fused_BxO = self.fusion(rgb_BxTxD, audio_BxTxA, mask_BxT, train=train)
    check_output("frame fusion", self.fusion, fused_BxO, rgb_BxTxD.shape[0])
    return classify(self, fused_BxO, train)


def _model_options(model_config: ml_collections.ConfigDict) -> tuple[str, bool, bool]:
  """Checks the options outside the module sections; returns (fusion_level, context_gating,
  normalize_frames). A config written before the last three existed lacks them: it means the
  paper's model."""
  if model_config.dtype not in DTYPES:
    raise ConfigError(
      f"config.model.dtype: got {model_config.dtype!r}; allowed: {', '.join(sorted(DTYPES))}"
    )
  level = model_config.get("fusion_level", "video")
  if level not in FUSION_LEVELS:
    raise ConfigError(
      f"config.model.fusion_level: got {level!r}; allowed: {', '.join(FUSION_LEVELS)}"
    )
  if level == "frame" and model_config.fusion not in FRAME_FUSIONS:
    raise ConfigError(
      f"config.model.fusion={model_config.fusion!r} has no frame-level version; with "
      f"fusion_level='frame' use one of: {', '.join(sorted(FRAME_FUSIONS))}"
    )
  switches = []
  for name in ("context_gating", "normalize_frames"):
    value = model_config.get(name, False)
    if not isinstance(value, bool):
      raise ConfigError(f"config.model.{name} must be True or False, got {value!r}")
    switches.append(value)
  return level, *switches


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Returns the (unbound) model that config.model selects; bad names or values raise."""
  model_config = config.model
  fusion_level, context_gating, normalize_frames = _model_options(model_config)
  dtype = DTYPES[model_config.dtype]
  agg_cls = module_config.lookup(AGGREGATORS, "aggregator", model_config.aggregator)
  fusion_cls = module_config.lookup(FUSIONS, "fusion", model_config.fusion)
  head_cls = module_config.lookup(CLASSIFIERS, "classifier", model_config.classifier)
  gates = {"fusion_gate": None, "output_gate": None}
  if context_gating:
    gates = {name: gating.ContextGating(dtype=dtype) for name in gates}
  top = dict(gates, normalize_frames=normalize_frames)  # What both top modules take.
  head = module_config.make(
    head_cls, model_config.classifier, config, dtype=dtype, num_classes=config.data.num_classes
  )
  aggregate = functools.partial(
    module_config.make, agg_cls, model_config.aggregator, config, dtype=dtype
  )

  if fusion_level == "frame":
    name = model_config.fusion
    frame_cls = FRAME_FUSIONS[name]
    fuse = module_config.make(
      frame_cls, f"frame_{name}", config, dtype=dtype, aggregator=aggregate()
    )
    return FrameFusionClassifier(fusion=fuse, classifier=head, **top)

  modalities = getattr(fusion_cls, "modalities", ("video", "audio"))
  return VideoClassifier(
    rgb_aggregator=aggregate() if "video" in modalities else None,
    audio_aggregator=aggregate() if "audio" in modalities else None,
    fusion=module_config.make(fusion_cls, model_config.fusion, config, dtype=dtype),
    classifier=head,
    **top,
  )


def input_shapes(
  config: ml_collections.ConfigDict, batch_size: int = 1, num_frames: int = 1
) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Abstract (rgb_BxTxD, audio_BxTxA, mask_BxT) inputs for `jax.eval_shape` of `init`."""
  B, T = batch_size, num_frames
  return (
    jax.ShapeDtypeStruct((B, T, config.data.rgb_size), jnp.float32),
    jax.ShapeDtypeStruct((B, T, config.data.audio_size), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.float32),
  )


def variable_shapes(
  config: ml_collections.ConfigDict, batch_size: int = 1, num_frames: int = 1
) -> dict:
  """The model's variables as ShapeDtypeStructs, its init traced on inputs of these sizes (with
  jax.eval_shape: nothing allocated; the key is made inside the trace, so JAX's backend starts
  only where a module asks for the devices, as DBoF does for their count)."""
  init = functools.partial(build_model(config).init, train=False)
  inputs = input_shapes(config, batch_size, num_frames)
  return jax.eval_shape(lambda *arrays: init(jax.random.key(0), *arrays), *inputs)


def count_params(config: ml_collections.ConfigDict) -> int:
  """Trainable parameters ('params' only: BatchNorm scale/bias count, running stats do not)."""
  leaves = jax.tree.leaves(variable_shapes(config)["params"])
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in leaves))


def beyond_configs() -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, config) of the models beyond the paper, at the paper's settings."""
  from configs import frame_mfb, paper  # Imported here: configs/ is not part of mfb_jax.

  rows = [(f"paper.py:{arg}", paper.get_config(arg)) for arg in paper.BEYOND_ARGS]
  rows += [(f"frame_mfb.py:{arg}", frame_mfb.get_config(arg)) for arg in frame_mfb.ARGS]
  for arg in ("dbof,mfb", "netvlad,mfb"):
    config = paper.get_config(arg)
    config.model.context_gating = True
    rows.append((f"paper.py:{arg} context_gating", config))
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """Prints the parameter counts of the paper's 15 models (configs/paper.py), and more."""
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", action="store_true", help="print the parameter count table")
  parser.add_argument(
    "--beyond", action="store_true", help="with --count: also the models beyond the paper"
  )
  args = parser.parse_args(argv)
  if not args.count:
    parser.error("nothing to do: pass --count")
  from configs import paper  # Imported here: configs/ is not part of the mfb_jax package.

  print(f"{'config (configs/paper.py:ARG)':<30} {'params':>12}  paper GAP")
  for arg in paper.ARGS:
    print(f"{arg:<30} {count_params(paper.get_config(arg)):>12,}  {paper.PAPER_GAP[arg]:.1f}")
  if args.beyond:
    print(f"\n{'beyond the paper (configs/...)':<40} {'params':>12}")
    for name, config in beyond_configs():
      print(f"{name:<40} {count_params(config):>12,}")


if __name__ == "__main__":
  main()
