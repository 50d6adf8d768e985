"""The fields a config has, against configs/default.py's (which has every field).

A config written for an older mfb-jax, or built by hand, may lack fields (OPTIONAL ones mean
their default.py values) or set fields nothing reads; `check` names both in one line.
"""

import difflib
import json

import ml_collections

from mfb_jax.errors import ConfigError

# Fields configs/default.py has that a config may leave out: the module sections (a missing one
# means the class defaults), the seed, the model options added after the paper's models, and
# the exponential schedule's settings (checked where that schedule is chosen).
OPTIONAL = (
  "seed",
  "model.fusion_level",
  "model.context_gating",
  "model.normalize_frames",
  "optim.decay_rate",
  "optim.decay_steps",
)


def check(config, mode: str) -> None:
  """ConfigError naming the fields of configs/default.py a config lacks (one written for an
  older mfb-jax, or built by hand): they were a KeyError deep in the run, exit 1."""
  from configs import default  # Deferred: configs/ is not part of the mfb_jax package.

  reference = default.get_config()
  missing = []
  for section, fields in reference.items():
    if section == "bench" and mode != "bench":  # Only the bench mode reads it.
      continue
    if not isinstance(fields, ml_collections.ConfigDict):
      if section not in config and section not in OPTIONAL:
        missing.append(section)
      continue
    if not isinstance(config.get(section), ml_collections.ConfigDict):
      missing.append(section)
      continue
    for name, value in fields.items():
      field = f"{section}.{name}"
      module_section = section == "model" and isinstance(value, ml_collections.ConfigDict)
      if name not in config[section] and not module_section and field not in OPTIONAL:
        missing.append(field)
  if missing:
    raise ConfigError(
      f"the config has no {', '.join(f'config.{f}' for f in missing[:5])}"
      f"{' and more' if len(missing) > 5 else ''} (configs/default.py has every field; "
      "a config written for an older version? build it from default.get_config())"
    )
  _check_unknown(config, reference)


def _check_unknown(config, reference) -> None:
  """ConfigError naming a field a config file sets that configs/default.py does not have (`c.train.
  batchsize = 3` in a config file was silently unused; a `--config.x` override is checked by
  the config's lock). A new section under config.model is a registered module's settings
  (a user's module, registered by the time the config is checked): allowed, and build_model
  checks its fields against the module's; under another name, in configs/default.py as well,
  it would never be read."""
  from mfb_jax import model as model_lib  # Deferred: the registries import flax.

  known = {}
  for section, fields in reference.items():
    if not isinstance(fields, ml_collections.ConfigDict):
      known[section] = None
      continue
    # Module sections count only under a registered name, in configs/default.py too (one added
    # there under a misspelled name was never read, its values silently the class defaults).
    modules_here = section == "model"
    known[section] = {
      name
      for name, value in fields.items()
      if not (modules_here and isinstance(value, ml_collections.ConfigDict))
    }
  modules = [*model_lib.AGGREGATORS, *model_lib.FUSIONS, *model_lib.CLASSIFIERS]
  modules += [f"frame_{name}" for name in model_lib.FRAME_FUSIONS]
  unknown = []
  for section, fields in config.items():
    if section not in known:
      unknown.append(section)
    elif known[section] is not None and isinstance(fields, ml_collections.ConfigDict):
      for name, value in fields.items():
        module = section == "model" and isinstance(value, ml_collections.ConfigDict)
        if name not in known[section] and not (module and name in modules):
          unknown.append(f"{section}.{name}")
  if not unknown:
    return
  field = unknown[0]
  section, _, name = field.rpartition(".")
  if section == "model" and isinstance(config.model[name], ml_collections.ConfigDict):
    close = difflib.get_close_matches(name, modules, n=1)
    hint = f"did you mean model.{close[0]}? " if close else ""
    raise ConfigError(
      f"config.model.{name} names no registered module, so nothing would read it ({hint}"
      f"modules: {', '.join(sorted(modules))})"
    )
  close = difflib.get_close_matches(name, sorted(known[section] if section else known), n=1)
  hint = f"did you mean {section + '.' if section else ''}{close[0]}? " if close else ""
  raise ConfigError(
    f"config.{field} is not a config field ({hint}configs/default.py lists every field)"
  )


def in_default_config(field: str) -> bool:
  """Whether configs/default.py's config has the dotted `field`."""
  from configs import default  # Deferred: configs/ is not part of the mfb_jax package.

  node = default.get_config()
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def optional_defaults() -> dict:
  """{'a.b': value} of configs/default.py for each OPTIONAL field: what a config (or an older
  config.json) that lacks one means."""
  from configs import default  # Deferred: configs/ is not part of the mfb_jax package.
  from mfb_jax import workdir_files  # Deferred: it imports JAX.

  flat = workdir_files.flat_hparams(json.loads(default.get_config().to_json_best_effort()))
  return {name: flat[name] for name in OPTIONAL if name in flat}
