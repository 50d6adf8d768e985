"""From config.model to module instances: a registry name looked up, its section's fields
checked against the class (unknown, missing, or out of range) and passed as keyword arguments.

Each mistake raises ConfigError with one line naming the config field.
"""

import dataclasses
import math

import flax.linen as nn
import ml_collections

from mfb_jax.errors import ConfigError


def lookup(registry: dict, kind: str, name: str) -> type:
  if name not in registry:
    raise ConfigError(
      f"config.model.{kind}: unknown name {name!r}; available: {', '.join(sorted(registry))}"
    )
  return registry[name]


POSITIVE_INT_FIELDS = (
  "hidden_size",
  "num_clusters",
  "factor",
  "output_dim",
  "num_experts",
  "order",
  "expansion",
  "groups",
)


# Each order of MFH is one more MFB block, built by a Python loop: a huge order would trace for
# hours before any memory check (the MFH paper uses 2 or 3).
MAX_ORDER = 16


def check_value(name: str, field: str, value) -> None:
  """Rejects the values that would otherwise fail deep inside a jitted step."""
  where = f"config.model.{name}.{field}"
  if field in POSITIVE_INT_FIELDS and (not isinstance(value, int) or value < 1):
    raise ConfigError(f"{where} must be a positive integer, got {value!r}")
  if field in POSITIVE_INT_FIELDS and value >= 2**31:  # XLA aborted the process on some.
    raise ConfigError(f"{where}={value!r} is invalid; it must be < 2**31")
  if field == "order" and value > MAX_ORDER:
    raise ConfigError(f"{where}={value!r} is invalid; it must be at most {MAX_ORDER}")
  if field == "dropout" and not 0.0 <= value < 1.0:
    raise ConfigError(f"{where} must be in [0, 1), got {value!r}")
  finite = isinstance(value, int | float) and math.isfinite(value)
  if field in ("l2_penalty", "expected_labels") and not (finite and value >= 0):
    raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
  if field == "output_scale" and not (finite and value > 0):
    raise ConfigError(f"{where} must be a finite number > 0, got {value!r}")


def check_section(cls: type, name: str, config: ml_collections.ConfigDict) -> dict:
  """config.model.<name>'s values (a missing section means none), checked against `cls`: a field
  it lacks, or a value check_value refuses. Run for every module's section, used or not."""
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
    check_value(name, field, value)
  return kwargs


def make(cls: type, name: str, config: ml_collections.ConfigDict, **extra) -> nn.Module:
  """Instantiates `cls` with the kwargs in config.model.<name> (a missing section means none)."""
  kwargs = check_section(cls, name, config)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  given = set(kwargs) | set(extra)
  required = [
    f.name
    for f in dataclasses.fields(cls)
    if f.name in fields
    and f.name not in given
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  ]
  if required:
    raise ConfigError(
      f"config.model.{name}: {cls.__name__} needs a value for {', '.join(required)}, which has "
      f"no default; add config.model.{name} = ml_collections.ConfigDict(dict({required[0]}=...)) "
      "to configs/default.py"
    )
  # Only modules that declare a dtype get one, so user modules need not.
  kwargs.update({k: v for k, v in extra.items() if k in fields})
  return cls(**kwargs)
