"""Every config in configs/ loads and builds (under jax.eval_shape); configs/paper.py in detail.

A config module whose get_config needs an argument lists its valid arguments in a module-level
`ARGS` tuple; each of them is loaded and built here.
"""

import functools
import importlib
import pathlib

import jax
import pytest

from configs import default, frame_mfb, paper
from mfb_jax import model

jax.config.update("jax_numpy_rank_promotion", "raise")

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# configs/workdir.py reads a trained workdir's config.json (tests/test_workdir_config.py).
CONFIG_NAMES = sorted(
  p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "workdir")
)


def config_cases():
  for name in CONFIG_NAMES:
    module = importlib.import_module(f"configs.{name}")
    for arg in getattr(module, "ARGS", (None,)):
      yield pytest.param(name, arg, id=f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize("name, arg", list(config_cases()))
def test_config_loads_and_builds(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.lock()  # As launch.py loads it: a field the model reads but the config lacks fails.
  net = model.build_model(config)
  T = config.data.max_frames if config.data.format == "frame" else 1
  init = functools.partial(net.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), *model.input_shapes(config, 2, T))
  probs = jax.eval_shape(
    functools.partial(net.apply, train=False), variables, *model.input_shapes(config, 2, T)
  )
  assert probs.shape == (2, config.data.num_classes)
  assert model.count_params(config) > 0


def test_config_discovery_sees_the_known_configs():
  assert {"default", "paper"} <= set(CONFIG_NAMES)


def test_reference_parameter_counts():
  # Same as the PyTorch peer (BatchNorm scale and bias counted, running statistics not).
  assert model.count_params(paper.get_config("netvlad,mfb")) == 57_556_540
  assert model.count_params(paper.get_config("dbof,mfb")) == 38_485_356


PAPER_TABLES = {  # Liu et al. 2018, Tables 1-3, in the order audio, video, concat, FC+concat, MFB.
  "avgpool": (38.1, 69.6, 74.2, 81.8, 83.3),
  "netvlad": (50.7, 82.3, 85.0, 84.6, 85.5),
  "dbof": (48.9, 81.8, 84.0, 84.1, 85.9),
}
FUSIONS = ("audio", "video", "concat", "fc_concat", "mfb")


def test_paper_gap_and_args_cover_the_15_cells():
  expected = {
    f"{agg},{fusion}": gap
    for agg, gaps in PAPER_TABLES.items()
    for fusion, gap in zip(FUSIONS, gaps, strict=True)
  }
  assert paper.PAPER_GAP == expected
  assert sorted(paper.ARGS) == sorted(expected)


@pytest.mark.parametrize("arg", paper.ARGS)
def test_paper_cell_overrides_only_the_model_names(arg):
  config = paper.get_config(arg)
  agg, fusion = arg.split(",")
  assert (config.model.aggregator, config.model.fusion) == (agg, fusion)
  reference = default.get_config()
  reference.model.aggregator, reference.model.fusion = agg, fusion
  assert config.to_dict() == reference.to_dict()
  # The docstring documents the launch command and the paper's GAP of this cell.
  assert f"# {arg}: paper GAP {paper.PAPER_GAP[arg]}" in paper.__doc__
  assert f"python launch.py --config=configs/paper.py:{arg} \\" in paper.__doc__


@pytest.mark.parametrize("arg", [None, "", "netvlad", "netvlad,mfb,moe", "vlad,mfb", "dbof,sum"])
def test_paper_bad_argument_names_allowed_values(arg):
  with pytest.raises(ValueError) as error:
    paper.get_config(arg)
  message = str(error.value)
  assert "avgpool, netvlad, dbof" in message
  assert "audio, video, concat, fc_concat, mfb" in message
  assert ("none was given" if arg is None else f"got {arg!r}") in message


def test_modules_users_register_are_accepted_by_the_paper_configs(monkeypatch):
  monkeypatch.setattr(model, "AGGREGATORS", {**model.AGGREGATORS, "maxpool": object})
  monkeypatch.setattr(model, "FUSIONS", {**model.FUSIONS, "hadamard": object})
  config = paper.get_config("maxpool,hadamard")
  assert (config.model.aggregator, config.model.fusion) == ("maxpool", "hadamard")
  assert frame_mfb.get_config("maxpool").model.aggregator == "maxpool"
  with pytest.raises(ValueError, match=r"AGG in \{avgpool, .*, nextvlad, maxpool\} and FUSION"):
    paper.get_config("minpool,hadamard")


def test_paper_argument_tolerates_spaces_and_case():
  config = paper.get_config(" NetVLAD, MFB ")
  assert (config.model.aggregator, config.model.fusion) == ("netvlad", "mfb")


def test_tiny_argument_must_be_two_names():
  from configs import tiny
  from mfb_jax.errors import ConfigError

  assert tiny.get_config(" DBoF, MFB ").model.aggregator == "dbof"
  with pytest.raises(ConfigError, match="configs/tiny.py needs AGG,FUSION.*got 'avgpool'"):
    tiny.get_config("avgpool")
