r"""A trained workdir's own config, rebuilt from its config.json: `--config=configs/workdir.py:W`.

Eval and predict must see the model as it was trained. Repeating the training command's
--config and every model override is easy to get wrong; this config reads them back instead:

  python launch.py --config=configs/workdir.py:/runs/a --workdir=/runs/a --mode=eval
  python launch.py --config=configs/workdir.py:/runs/a --workdir=/runs/a --mode=predict \
    --config.data.predict_pattern='/data/yt8m/frame/test*.tfrecord'

Overrides apply on top as with any config. config.json is the resolved config of the workdir's
last training run (`launch.py` writes it at start-up; a URL workdir such as gs://bucket/run
works too). Fields that configs/default.py has and an older config.json lacks keep their
default.py values, which is what that run used.
"""

import json
import os

import ml_collections

from configs import default
from mfb_jax.errors import ConfigError

CONFIG_FILE = "config.json"


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  """configs/default.py's config with the workdir's config.json laid over it."""
  if not workdir:
    raise ConfigError(
      "configs/workdir.py needs the trained workdir: --config=configs/workdir.py:WORKDIR "
      f"({'none was given' if workdir is None else 'it is empty'})"
    )
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  import tensorflow as tf  # Deferred: tf.io.gfile reads local paths and bucket URLs alike.

  try:
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  except tf.errors.NotFoundError:
    raise ConfigError(f"no {path}: is {workdir} a workdir that has been trained?") from None
  except tf.errors.OpError as e:
    raise ConfigError(f"cannot read {path}: {e.message}") from None
  try:
    values = json.loads(text)
  except ValueError as e:
    raise ConfigError(f"{path} is not JSON ({e}); was the training run cut short?") from None
  if not isinstance(values, dict):
    raise ConfigError(f"{path} holds no config (a JSON {type(values).__name__})")
  config = default.get_config()
  _lay_over(config, values)
  return config


def _lay_over(config: ml_collections.ConfigDict, values: dict) -> None:
  """config updated from values, section by section (a section default.py lacks, such as a
  user's module settings, is added whole)."""
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _lay_over(config[key], value)
    elif isinstance(value, dict):
      config[key] = ml_collections.ConfigDict(value)
    else:
      config[key] = value
