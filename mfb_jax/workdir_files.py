"""Small files in the workdir that users and scripts read: config.json and hparams."""

import json
import os

import jax
import ml_collections

CONFIG_FILE = "config.json"


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config as WORKDIR/config.json (process 0, atomically)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as flat {'a.b': scalar} pairs for TensorBoard's hparams plugin."""
  flat = {}

  def visit(prefix: str, node) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        visit(name + ".", value)
      elif isinstance(value, (bool, int, float, str)):
        flat[name] = value
      else:
        flat[name] = json.dumps(value, default=str)

  visit("", config)
  return flat
