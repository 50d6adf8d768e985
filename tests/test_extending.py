"""The README's "Add your own fusion" example runs as written and gives a working new model."""

import functools
import pathlib
import re

import jax
import numpy as np
import pytest

from mfb_jax import model

jax.config.update("jax_numpy_rank_promotion", "raise")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- extend-example:start -->", "<!-- extend-example:end -->"


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def example_code(text: str) -> str:
  """The first ```python block between the extend-example markers."""
  assert START in text and END in text, f"{README} lacks the {START} ... {END} section"
  section = text[text.index(START) : text.index(END)]
  match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
  assert match, "no ```python block in the extend-example section"
  return match.group(1)


def test_readme_fusion_example_builds_a_different_model(monkeypatch, capsys):
  # The example registers into model.FUSIONS: give it a copy so other tests see the original.
  monkeypatch.setattr(model, "FUSIONS", dict(model.FUSIONS))
  namespace = {"__name__": "readme_example"}
  text = README.read_text() if README.exists() else ""
  exec(compile(example_code(text), str(README), "exec"), namespace)
  printed = capsys.readouterr().out
  assert f"{model.count_params(namespace['config']):,} parameters" in printed

  new_name = namespace["config"].model.fusion
  assert new_name not in {"audio", "video", "concat", "fc_concat", "mfb"}
  assert isinstance(namespace["net"].fusion, model.FUSIONS[new_name])

  # Run it at small sizes, next to the same model with concatenation.
  config = namespace["config"]
  config.data.num_classes = 7
  config.model.netvlad.num_clusters = 2
  rng = np.random.default_rng(0)
  rgb = rng.normal(size=(2, 5, 6)).astype(np.float32)
  audio = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mask = np.ones((2, 5), np.float32)
  probs = {}
  for fusion in (new_name, "concat"):
    config.model.fusion = fusion
    net = model.build_model(config)
    # Jitted: one compile instead of dozens of op-by-op ones.
    variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0), rgb, audio, mask
    )
    probs[fusion] = np.asarray(jax.jit(net.apply)(variables, rgb, audio, mask))
    assert probs[fusion].shape == (2, 7)
    assert np.isfinite(probs[fusion]).all()
  assert np.abs(probs[new_name] - probs["concat"]).max() > 1e-4
