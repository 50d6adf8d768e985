"""The model zoo: registries and `build_model(config)` = aggregation -> fusion -> classifier.

Each registry maps a config name to a Flax linen class; `config.model.<name>` (if present) holds
that class's keyword arguments. Adding a module = one class + one dict entry.

Shape letters: B batch, T frames, D rgb size, A audio size, V and G the aggregated rgb and audio
sizes, O fused size, C classes.

  python -m mfb_jax.model --count    # parameter counts of the paper's 15 models
"""

import argparse
import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mfb_jax import aggregation, classifier, fusion
from mfb_jax.errors import ConfigError

AGGREGATORS = {
  "avgpool": aggregation.AvgPool,
  "dbof": aggregation.DBoF,
  "netvlad": aggregation.NetVLAD,
}
FUSIONS = {
  "audio": fusion.AudioOnly,
  "video": fusion.VideoOnly,
  "concat": fusion.Concat,
  "fc_concat": fusion.FcConcat,
  "mfb": fusion.MFB,
}
CLASSIFIERS = {
  "moe": classifier.MoE,
  "logistic": classifier.Logistic,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class VideoClassifier(nn.Module):
  """Per-modality aggregation -> fusion -> classifier; returns probs_BxC in [0, 1] (float32)."""

  rgb_aggregator: nn.Module | None  # None when the fusion does not read the video vector.
  audio_aggregator: nn.Module | None  # None when the fusion does not read the audio vector.
  fusion: nn.Module
  classifier: nn.Module

  @nn.compact
  def __call__(
    self,
    rgb_BxTxD: jax.Array,
    audio_BxTxA: jax.Array,
    mask_BxT: jax.Array,
    train: bool = False,
  ) -> jax.Array:
    video_BxV = audio_BxG = None
    if self.rgb_aggregator is not None:
      video_BxV = self.rgb_aggregator(rgb_BxTxD, mask_BxT, train=train)
    if self.audio_aggregator is not None:
      audio_BxG = self.audio_aggregator(audio_BxTxA, mask_BxT, train=train)
    fused_BxO = self.fusion(video_BxV, audio_BxG, train=train)
    return self.classifier(fused_BxO, train=train).astype(jnp.float32)


def _lookup(registry: dict, kind: str, name: str) -> type:
  if name not in registry:
    raise ConfigError(
      f"config.model.{kind}: unknown name {name!r}; available: {', '.join(sorted(registry))}"
    )
  return registry[name]


POSITIVE_INT_FIELDS = ("hidden_size", "num_clusters", "factor", "output_dim", "num_experts")


def _check_value(name: str, field: str, value) -> None:
  """Rejects the values that would otherwise fail deep inside a jitted step."""
  where = f"config.model.{name}.{field}"
  if field in POSITIVE_INT_FIELDS and (not isinstance(value, int) or value < 1):
    raise ConfigError(f"{where} must be a positive integer, got {value!r}")
  if field == "dropout" and not 0.0 <= value < 1.0:
    raise ConfigError(f"{where} must be in [0, 1), got {value!r}")
  if field == "l2_penalty" and value < 0:
    raise ConfigError(f"{where} must be >= 0, got {value!r}")


def _make(cls: type, name: str, config: ml_collections.ConfigDict, **extra) -> nn.Module:
  """Instantiates `cls` with the kwargs in config.model.<name> (a missing section means none)."""
  section = config.model.get(name)
  kwargs = section.to_dict() if section is not None else {}
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(
      f"config.model.{name}: {cls.__name__} takes no field {unknown[0]!r}; "
      f"its fields: {', '.join(sorted(fields)) or 'none'}"
    )
  for field, value in kwargs.items():
    _check_value(name, field, value)
  # Only modules that declare a dtype get one, so user modules need not.
  kwargs.update({k: v for k, v in extra.items() if k in fields})
  return cls(**kwargs)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Returns the (unbound) model that config.model selects; bad names or values raise."""
  model_config = config.model
  if model_config.dtype not in DTYPES:
    raise ConfigError(
      f"config.model.dtype: got {model_config.dtype!r}; allowed: {', '.join(sorted(DTYPES))}"
    )
  dtype = DTYPES[model_config.dtype]
  agg_cls = _lookup(AGGREGATORS, "aggregator", model_config.aggregator)
  fusion_cls = _lookup(FUSIONS, "fusion", model_config.fusion)
  head_cls = _lookup(CLASSIFIERS, "classifier", model_config.classifier)
  modalities = getattr(fusion_cls, "modalities", ("video", "audio"))

  def aggregator(modality: str) -> nn.Module | None:
    if modality not in modalities:
      return None
    return _make(agg_cls, model_config.aggregator, config, dtype=dtype)

  return VideoClassifier(
    rgb_aggregator=aggregator("video"),
    audio_aggregator=aggregator("audio"),
    fusion=_make(fusion_cls, model_config.fusion, config, dtype=dtype),
    classifier=_make(
      head_cls, model_config.classifier, config, dtype=dtype, num_classes=config.data.num_classes
    ),
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


def variable_shapes(config: ml_collections.ConfigDict) -> dict:
  """The model's variables as ShapeDtypeStructs (traced with jax.eval_shape: nothing allocated)."""
  init = functools.partial(build_model(config).init, train=False)
  return jax.eval_shape(init, jax.random.key(0), *input_shapes(config))


def count_params(config: ml_collections.ConfigDict) -> int:
  """Trainable parameters ('params' only: BatchNorm scale/bias count, running stats do not)."""
  leaves = jax.tree.leaves(variable_shapes(config)["params"])
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in leaves))


def main(argv: Sequence[str] | None = None) -> None:
  """Prints the parameter counts of the paper's 15 models (configs/paper.py)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", action="store_true", help="print the parameter count table")
  args = parser.parse_args(argv)
  if not args.count:
    parser.error("nothing to do: pass --count")
  from configs import paper  # Imported here: configs/ is not part of the mfb_jax package.

  print(f"{'config (configs/paper.py:ARG)':<30} {'params':>12}  paper GAP")
  for arg in paper.ARGS:
    print(f"{arg:<30} {count_params(paper.get_config(arg)):>12,}  {paper.PAPER_GAP[arg]:.1f}")


if __name__ == "__main__":
  main()
