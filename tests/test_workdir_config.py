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


@pytest.mark.parametrize(
  "text, message",
  [
    (None, r"^no .*config\.json: is .* a workdir that has been trained\?$"),
    ('{"model": ', r"config\.json is not JSON \(.*\); was the training run cut short\?$"),
    ("[1, 2]", r"config\.json holds no config \(a JSON list\)$"),
  ],
)
def test_a_workdir_without_a_readable_config_json_is_one_line(tmp_path, text, message):
  if text is not None:
    (tmp_path / "config.json").write_text(text)
  with pytest.raises(ConfigError, match=message):
    workdir.get_config(str(tmp_path))


def test_the_workdir_must_be_given():
  with pytest.raises(ConfigError, match=r"--config=configs/workdir\.py:WORKDIR \(none was given\)"):
    workdir.get_config()
