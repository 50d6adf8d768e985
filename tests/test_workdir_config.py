"""configs/workdir.py: a trained workdir's config, rebuilt from its config.json."""

import json

import pytest

from configs import default, workdir
from mfb_jax.errors import ConfigError


def test_config_json_is_laid_over_the_defaults(tmp_path):
  values = json.loads(default.get_config().to_json_best_effort())
  values["model"].update(aggregator="netvlad", normalize_frames=True)
  values["model"]["my_pool"] = {"width": 3}  # A user's module section: added whole.
  del values["optim"]["decay_rate"]  # A config.json from before the field: its default stays.
  (tmp_path / "config.json").write_text(json.dumps(values))
  config = workdir.get_config(str(tmp_path))
  assert config.model.aggregator == "netvlad" and config.model.normalize_frames is True
  assert config.model.my_pool.width == 3
  assert config.optim.decay_rate == default.get_config().optim.decay_rate
  assert config.to_json_best_effort() != default.get_config().to_json_best_effort()


def _edited(**changes) -> str:
  """configs/default.py's config.json with `changes` ('section.field': value) made."""
  values = json.loads(default.get_config().to_json_best_effort())
  for field, value in changes.items():
    section, name = field.split(".")
    values[section][name] = value
  return json.dumps(values)


@pytest.mark.parametrize(
  "text, message",
  [
    (None, r"^no .*config\.json: is .* a workdir that has been trained\?$"),
    ('{"model": ', r"config\.json is not JSON \(.*\); was the training run cut short\?$"),
    (b"\xff\xfe{}", r"config\.json is not UTF-8 text \(invalid start byte at byte 0\)$"),
    ("[1, 2]", r"config\.json holds a JSON list \(not the config\.json of a training run\)$"),
    ("{}", r"config\.json holds no model \(not the config\.json of a training run\)$"),
    # Edited by hand, or another version's: named by field, not ml_collections' casting words.
    (_edited(**{"data.max_frames": "12"}), r"json: data\.max_frames is '12', where .* an int$"),
    (_edited(**{"data.max_frames": 12.5}), r"data\.max_frames is 12\.5, where .* has an int$"),
    (_edited(**{"data.max_frames": True}), r"data\.max_frames is True, where .* has an int$"),
    (_edited(**{"model.normalize_frames": 1}), r"model\.normalize_frames is 1, where .* a bool$"),
    (_edited(**{"data.max_frames": {"a": 1}}), r"data\.max_frames is \{'a': 1\}, where .* an int$"),
    (_edited(**{"model.mfb": 3}), r"model\.mfb is 3, where configs/default\.py has a section$"),
    (_edited(**{"data.maxframes": 3}), r"has data\.maxframes, which configs/default\.py does not"),
  ],
)
def test_a_config_json_that_cannot_be_read_back_is_one_line(tmp_path, text, message):
  if isinstance(text, bytes):
    (tmp_path / "config.json").write_bytes(text)
  elif text is not None:
    (tmp_path / "config.json").write_text(text)
  with pytest.raises(ConfigError, match=message):
    workdir.get_config(str(tmp_path))


def test_the_file_itself_is_not_taken_for_the_workdir(tmp_path):
  with pytest.raises(ConfigError, match=r"names the file; give its workdir: --config=.*:/"):
    workdir.get_config(str(tmp_path / "config.json"))


def test_the_workdir_must_be_given():
  with pytest.raises(ConfigError, match=r"--config=configs/workdir\.py:WORKDIR \(none was given\)"):
    workdir.get_config()
