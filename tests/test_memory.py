"""The memory check before a step first runs (mfb_jax/memory.py), against sizes known by hand."""

import jax
import jax.numpy as jnp
import pytest
from conftest import run_python

from mfb_jax import evaluate, memory, predict, runtime, trainer
from mfb_jax.errors import ResourceError

MB = 1_000_000


def test_an_output_not_written_in_place_counts_and_a_donated_one_does_not():
  x = jnp.ones((1000, 1000), jnp.float32)  # 4 MB.
  fresh = jax.jit(lambda a: a * 2.0).lower(x).compile()
  in_place = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()
  assert memory.step_needs(fresh) >= 4 * MB
  assert memory.step_needs(in_place) < 4 * MB
  # A product of two 4 MB matrices plus one: the product is a temporary or written in place.
  assert 4 * MB <= memory.step_needs(jax.jit(lambda a: a @ a + 1.0).lower(x).compile()) <= 8 * MB


def _files(tmp_path, meminfo_kb: int, cgroup: tuple[str, str] | None):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text(f"MemTotal:  99999999 kB\nMemFree:  1 kB\nMemAvailable:  {meminfo_kb} kB\n")
  limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
  if cgroup is not None:
    limit.write_text(cgroup[0] + "\n")
    usage.write_text(cgroup[1] + "\n")
  return str(meminfo), ((str(limit), str(usage)),)


@pytest.mark.parametrize(
  "meminfo_kb, cgroup, expected",
  [
    (1000, None, 1_024_000),  # No cgroup files: the host's MemAvailable.
    (1000, ("max", "5"), 1_024_000),  # A cgroup without a limit.
    (1000, ("500000", "100000"), 400_000),  # A cgroup limit below MemAvailable.
    (100, ("500000", "100000"), 102_400),  # MemAvailable below the cgroup's room.
    (1000, ("100", "500"), 0),  # Over its limit already.
  ],
)
def test_the_host_has_what_meminfo_and_the_cgroup_both_allow(
  tmp_path, monkeypatch, meminfo_kb, cgroup, expected
):
  meminfo, cgroup_files = _files(tmp_path, meminfo_kb, cgroup)
  monkeypatch.setattr(memory, "_MEMINFO", meminfo)
  monkeypatch.setattr(memory, "_CGROUP_FILES", cgroup_files)
  assert memory.host_available() == expected


def test_a_step_that_does_not_fit_is_one_line_naming_what_and_the_settings(monkeypatch):
  x = jnp.ones((1000, 1000), jnp.float32)
  step = jax.jit(lambda a: a * 2.0)
  devices = len(jax.local_devices())  # A CPU's devices share the host's memory.
  monkeypatch.setattr(memory, "device_available", lambda device: 3 * MB)
  with pytest.raises(ResourceError) as raised:
    memory.check_fits(step, (x,), "the doubling step", "the size of a")
  message = str(raised.value)
  assert "\n" not in message
  needs = memory.step_needs(step.lower(x).compile()) * devices
  assert f"the doubling step needs about {needs / 1e6:.1f} MB of memory" in message
  assert message.endswith("the host has 3.0 MB available: lower the size of a")
  monkeypatch.setattr(memory, "device_available", lambda device: needs)
  memory.check_fits(step, (x,), "the doubling step", "the size of a")  # Just fits.
  monkeypatch.setattr(memory, "device_available", lambda device: None)
  memory.check_fits(step, (x,), "the doubling step", "the size of a")  # Unknown: no check.


def _no_memory(monkeypatch):
  monkeypatch.setattr(memory, "host_available", lambda: 1000)


def test_training_that_does_not_fit_stops_before_its_first_step(tiny_config, tmp_path, monkeypatch):
  _no_memory(monkeypatch)
  model = tiny_config.model
  with pytest.raises(ResourceError) as raised:
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert str(raised.value).startswith(
    f"the train step of {model.aggregator}+{model.fusion}+moe at batch 8 needs about"
  )
  assert str(raised.value).endswith(
    "available: lower train.batch_size or data.max_frames, or set model.dtype=bfloat16"
  )
  assert not list(tmp_path.glob("checkpoints/*"))  # Nothing saved.


def test_eval_and_predict_that_do_not_fit_name_eval_batch_size(
  tiny_config, trained_workdir, monkeypatch
):
  _no_memory(monkeypatch)
  with pytest.raises(ResourceError, match=r"the eval step of .* lower eval.batch_size or data"):
    evaluate.run_eval(tiny_config, str(trained_workdir))
  with pytest.raises(ResourceError, match=r"the predict step of .* lower eval.batch_size or data"):
    predict.run_predict(tiny_config, str(trained_workdir))
  assert not (trained_workdir / predict.PREDICTIONS_FILE).exists()


_RELEASE = """
import numpy as np
from mfb_jax import memory, runtime

def resident():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096

assert runtime.tcmalloc_loaded()
for _ in range(3):  # Freed buffers of a step's sizes, which tcmalloc keeps for reuse.
  buffers = [np.ones(25_000_000 + 1000 * i, np.float32) for i in range(20)]
  del buffers
kept = resident()
memory.release_free_memory()
print((kept - resident()) / 1e9)
"""


@pytest.mark.skipif(runtime.tcmalloc_library() is None, reason="tcmalloc is not installed")
def test_memory_tcmalloc_keeps_from_freed_buffers_is_counted_as_available():
  library = runtime.tcmalloc_library()
  result = run_python(["-c", _RELEASE], env={"LD_PRELOAD": library}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.split()[-1]) > 1.0  # Of the last round's 2 GB, kept until released.
