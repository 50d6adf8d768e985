"""What the start-up memory check counts beside the state: the batches the input pipeline and the
steps hold, the train step's temporaries and a checkpoint being saved (mfb_jax/memory.py), against
what a process measurably holds."""

import itertools
import json
import textwrap

import jax
import pytest
from conftest import run_python

from mfb_jax import available_memory, bench, input_pipeline, memory, progress, runtime, trainer
from mfb_jax import train as train_lib
from mfb_jax.errors import DataError, ResourceError


@pytest.mark.parametrize("cores, calls", [(1, 1), (2, 2), (8, 8), (64, 8)])
def test_batch_sized_map_calls_are_one_per_core_and_at_most_eight(monkeypatch, cores, calls):
  # tf.data's AUTOTUNE went up to the core count: 64 batches beside the prefetched ones on a
  # 64-core host, none of them counted.
  monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)))
  assert runtime.batch_calls() == calls


# A process that pulls batches of 256 videos of 300 frames (354 MB each) from the training
# pipeline, slower than the pipeline fills its buffers, holding the last one as the trainer
# does, and prints its peak resident memory beyond what it held before.
_PULL_SLOWLY = """
import json, sys, time
import mfb_jax
from configs import tiny
from mfb_jax import input_pipeline, memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
config = tiny.get_config()
config.data.update(train_pattern=sys.argv[1], max_frames=300)
files = input_pipeline.TrainFiles(config.data.train_pattern)
next(files.batches(config, 0, 2))  # TensorFlow's kernels and threads, before the baseline.
baseline, peak = rss(), 0
batches = files.batches(config, 0, 256)
for _ in range(8):
  batch = next(batches)
  time.sleep(0.5)  # Every buffer fills meanwhile.
  peak = max(peak, rss())
held, batch = memory.held_batches(config), memory.batch_bytes(config, 256)
print(json.dumps({"beyond": peak - baseline, "batch": batch, "held": held}))
"""


def test_the_pipeline_holds_no_more_batches_than_are_counted(tmp_path):
  # Counted were data.prefetch_batches + 2 = 4; the pipeline held 6.2-6.5 with the consumer's.
  from mfb_jax import synthetic

  synthetic.write_dataset(
    str(tmp_path), num_train=128, num_eval=0, num_shards=2, num_classes=64, frames=(300, 300)
  )
  pattern = str(tmp_path / "train-*")
  result = run_python(["-c", textwrap.dedent(_PULL_SLOWLY), pattern])
  assert result.returncode == 0, result.stderr[-2000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  # The consumer's batch is the one handed over; no step holds one here.
  counted = (measured["held"] - progress.STEPS_AHEAD) * measured["batch"]
  assert measured["beyond"] <= counted, measured
  assert measured["beyond"] >= 3 * measured["batch"], measured  # It did fill its buffers.


def _refusal_on_the_second_look(check, monkeypatch) -> str:
  """The ResourceError of `check` where the host has room for everything the first, compile-free
  look counts and none for the train step's temporaries."""
  looks = itertools.chain([10**15], itertools.repeat(1000))
  monkeypatch.setattr(available_memory, "host_available", lambda: next(looks))
  with pytest.raises(ResourceError) as raised:
    check()
  return str(raised.value)


def test_training_counts_the_train_steps_temporaries_and_a_checkpoint_being_saved(
  tiny_config, tmp_path, monkeypatch
):
  message = _refusal_on_the_second_look(
    lambda: trainer.train_and_evaluate(tiny_config, str(tmp_path)), monkeypatch
  )
  model, tx = train_lib.build(tiny_config)
  mesh = train_lib.make_mesh()
  shapes = train_lib.abstract_state(tiny_config, model, tx, mesh)
  batch = train_lib.abstract_batch(tiny_config, tiny_config.train.batch_size, mesh)
  jitted = train_lib.jit_train_step(tiny_config, model, tx, mesh, shapes)
  # The variant with the parameter norms, the larger.
  temporaries = memory.step_needs(jitted.lower(shapes, batch, True).compile())
  state = memory.tree_bytes(shapes)
  name = f"{tiny_config.model.aggregator}+{tiny_config.model.fusion}+moe"
  running = memory.amount(state + temporaries)
  assert message.startswith(f"the state of {name} and its train step's temporaries ({running}), ")
  assert f"a checkpoint being saved ({memory.amount(2 * state)})" in message  # Copied, encoded.
  assert "or train.batch_size or data.max_frames (the step), or data.num_classes" in message
  assert message.endswith(", or set model.dtype=bfloat16")
  assert not (tmp_path / "checkpoints").exists()
  # The bench saves nothing; it holds its step's temporaries too (here more than initializing).
  tiny_config.bench.end_to_end = False
  tiny_config.train.batch_size = 256
  message = _refusal_on_the_second_look(lambda: bench.fresh_train_step(tiny_config), monkeypatch)
  assert message.startswith(f"the state of {name} and its train step's temporaries (")
  assert "checkpoint" not in message
  # The bare step holds its two in-memory batches and no pipeline.
  assert "and 2 input batches of 256 videos (" in message
  assert "prefetch" not in message


@pytest.mark.parametrize("data_format", ["frame", "video"])
def test_the_abstract_batch_is_the_pipelines_so_the_step_compiles_once(
  tiny_config, tmp_path, data_format
):
  from mfb_jax import synthetic

  synthetic.write_dataset(
    str(tmp_path),
    num_train=16,
    num_eval=0,
    num_shards=1,
    num_classes=64,
    frames=(8, 24),
    fmt=data_format,
  )
  tiny_config.data.update(format=data_format, train_pattern=str(tmp_path / "train-*"))
  mesh = train_lib.make_mesh()
  local = next(input_pipeline.TrainFiles(tiny_config.data.train_pattern).batches(tiny_config, 0, 8))
  pipeline = input_pipeline.to_global(local, mesh)
  abstract = train_lib.abstract_batch(tiny_config, 8, mesh)
  as_seen = lambda x: (x.shape, x.dtype, x.sharding)
  assert jax.tree.map(as_seen, abstract) == jax.tree.map(as_seen, pipeline)


def _parallel_calls(dataset) -> list[int]:
  """num_parallel_calls of each parallel map of a tf.data pipeline, from its output back."""
  calls = []
  while dataset is not None:
    if hasattr(dataset, "_num_parallel_calls"):
      calls.append(int(dataset._num_parallel_calls))
    dataset = getattr(dataset, "_input_dataset", None)
  return calls


@pytest.mark.parametrize("data_format", ["frame", "video"])
def test_the_pipelines_batch_sized_maps_run_the_counted_calls(
  tiny_config, monkeypatch, data_format
):
  import tensorflow as tf

  monkeypatch.setattr(runtime, "batch_calls", lambda: 3)
  tiny_config.data.format = data_format
  files = input_pipeline.TrainFiles(tiny_config.data.train_pattern)
  train, _ = input_pipeline.train_dataset(tiny_config, files, 0, 8)
  evaluation = input_pipeline.eval_dataset(tiny_config, files.paths, 8)
  for dataset in (train, evaluation):
    # The batch-sized map is the last; video-level records are parsed one by one before it.
    calls = _parallel_calls(dataset)
    assert calls[0] == 3, calls
    assert all(c == tf.data.AUTOTUNE for c in calls[1:]), calls


def test_a_bad_eval_pattern_is_found_before_the_train_step_compiles(
  tiny_config, tmp_path, monkeypatch
):
  # The memory check compiles the train step (seconds for a paper model); cheaper checks go first.
  def compiles(*args, **kwargs):
    raise AssertionError("the memory check ran first")

  monkeypatch.setattr(memory, "check_state_and_inputs", compiles)
  tiny_config.data.eval_pattern = str(tmp_path / "nothing-*")
  with pytest.raises(DataError, match="^data.eval_pattern: no file matches"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path / "work"))


def test_an_already_trained_run_does_not_compile_its_train_step(
  tiny_config, trained_workdir, monkeypatch
):
  steps = []
  check = memory.check_state_and_inputs
  monkeypatch.setattr(
    memory,
    "check_state_and_inputs",
    lambda *args, **kwargs: steps.append(kwargs["step"]) or check(*args, **kwargs),
  )
  trainer.train_and_evaluate(tiny_config, str(trained_workdir))  # Trained to step 6: evaluates.
  assert steps == [None]
  tiny_config.train.num_steps = 7
  trainer.train_and_evaluate(tiny_config, str(trained_workdir))
  assert steps[1] is not None
