r"""A trained workdir's own config, rebuilt from its config.json: `--config=configs/workdir.py:W`.

Eval and predict must see the model as it was trained. Repeating the training command's
--config and every model override is easy to get wrong; this config reads them back instead:

  python launch.py --config=configs/workdir.py:/runs/a --workdir=/runs/a --mode=eval
  python launch.py --config=configs/workdir.py:/runs/a --workdir=/runs/a --mode=predict \
    --config.data.predict_pattern='/data/yt8m/frame/test*.tfrecord'

Overrides apply on top as with any config. config.json is the resolved config of the workdir's
last training run (`launch.py` writes it once the run has restored or initialized its state; a
URL workdir such as gs://bucket/run works too). Fields that configs/default.py has and an older
config.json lacks take their default.py values; a field default.py does not have (another
version's config.json, or one edited by hand) or a value of another type is one line naming
config.json, as is a file that is no config.json of a training run.
"""

import json
import os

import ml_collections

from configs import default
from mfb_jax.errors import ConfigError
from mfb_jax.workdir_files import CONFIG_FILE


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  """configs/default.py's config with the workdir's config.json laid over it."""
  if not workdir:
    raise ConfigError(
      "configs/workdir.py needs the trained workdir: --config=configs/workdir.py:WORKDIR "
      f"({'none was given' if workdir is None else 'it is empty'})"
    )
  workdir = os.path.expanduser(workdir)
  if os.path.basename(workdir.rstrip("/")) == CONFIG_FILE:
    raise ConfigError(
      f"configs/workdir.py:{workdir} names the file; give its workdir: "
      f"--config=configs/workdir.py:{os.path.dirname(workdir.rstrip('/')) or '.'}"
    )
  path = os.path.join(workdir, CONFIG_FILE)
  values = _load(path, workdir)
  if not isinstance(values, dict) or not all(key in values for key in ("data", "model")):
    kind = f"a JSON {type(values).__name__}" if not isinstance(values, dict) else "no model"
    raise ConfigError(f"{path} holds {kind} (not the config.json of a training run)")
  config = default.get_config()
  _lay_over(config, values, path)
  return config


def _load(path: str, workdir: str):
  """config.json's JSON value; one line (ConfigError) where it cannot be read as JSON."""
  import tensorflow as tf  # Deferred: tf.io.gfile reads local paths and bucket URLs alike.

  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except tf.errors.NotFoundError:
    raise ConfigError(f"no {path}: is {workdir} a workdir that has been trained?") from None
  except tf.errors.OpError as e:
    raise ConfigError(f"cannot read {path}: {' '.join(e.message.split())}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  except ValueError as e:
    raise ConfigError(f"{path} is not JSON ({e}); was the training run cut short?") from None


def _lay_over(config: ml_collections.ConfigDict, values: dict, path: str, prefix="") -> None:
  """config updated from values, section by section; a section default.py lacks under model
  (a user's module settings) is added whole. Anything else default.py lacks, or a value of
  another type than default.py's, is a ConfigError naming the field and `path`."""
  for key, value in values.items():
    field = f"{prefix}{key}"
    if key not in config:
      if prefix == "model." and isinstance(value, dict):
        config[key] = ml_collections.ConfigDict(value)
        continue
      raise ConfigError(
        f"{path} has {field}, which configs/default.py does not (the config.json of another "
        "version of mfb-jax? give --config=FILE instead)"
      )
    section = isinstance(config[key], ml_collections.ConfigDict)
    if section and isinstance(value, dict):
      _lay_over(config[key], value, path, f"{field}.")
      continue
    was = config[key]
    # A bool where a number is (ConfigDict would take it), or the reverse, is another type too.
    fits = not section and (was is None or isinstance(value, bool) == isinstance(was, bool))
    if fits:
      try:
        config[key] = value
      except TypeError:
        fits = False
    if not fits:
      kind = type(was).__name__
      want = "a section" if section else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
      raise ConfigError(f"{path}: {field} is {value!r}, where configs/default.py has {want}")
