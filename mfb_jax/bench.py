"""--mode=bench: throughput of the real jitted train step on in-memory batches of the real shapes.

Prints one JSON line (examples_per_sec, step_ms, batch_size, devices, model, the analytic FLOP
floor and the fraction of it reached). No data files are needed. The bare step needs no
TensorFlow either (an accelerator machine may lack it); only the end-to-end figure reads tfrecords.
"""

import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mfb_jax import config_checks, errors, flops, memory, quantization, runtime
from mfb_jax import train as train_lib
from mfb_jax.errors import ConfigError


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """A batch like the pipeline's: dequantized uint8 features (in the pipeline's dtype), full
  masks, ~3 labels per video."""
  rng = np.random.default_rng(seed)
  T = train_lib.frames_per_example(config)
  dtype = jnp.dtype(config.model.dtype)  # The pipeline's feature dtype (records.feature_dtype).
  features = lambda dim: quantization.dequantize(
    rng.integers(0, 256, (batch_size, T, dim), dtype=np.uint8), dtype
  )
  return {
    "rgb": features(config.data.rgb_size),
    "audio": features(config.data.audio_size),
    "mask": np.ones((batch_size, T), np.float32),
    "labels": (rng.random((batch_size, config.data.num_classes)) < 3.0 / 3862).astype(np.float32),
    "valid": np.ones((batch_size,), np.float32),  # As the pipeline's: one compiled step for both.
  }


def fresh_train_step(
  config: ml_collections.ConfigDict, num_batches: int = 2, pipeline: bool | None = None
):
  """(mesh, freshly initialized state, jitted train step) of the configured model, after checking
  the memory of the state, the step, `num_batches` in-memory batches and, with an input `pipeline`
  (default: config.bench.end_to_end), the pipeline's batches and shuffle buffer."""
  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(config)
  shapes = train_lib.abstract_state(config, model, tx, mesh)
  init = train_lib.state_initializer(config, model, tx, mesh)
  step_fn = train_lib.jit_train_step(config, model, tx, mesh, shapes)
  # The end-to-end figure reads synthetic records of max_frames frames through a shuffle buffer.
  end_to_end = config.bench.end_to_end if pipeline is None else pipeline
  record = memory.record_bytes(config) if end_to_end else 0
  # The bare step's in-memory batches; end to end, the pipeline's beside them.
  step = (step_fn, (shapes, train_lib.abstract_batch(config, config.train.batch_size, mesh)))
  check = lambda: memory.check_state_and_inputs(
    config, shapes, "train", init, record, extra_batches=num_batches, step=step, pipeline=end_to_end
  )
  errors.agreed(check)
  state = init()
  return mesh, state, step_fn


def _local_batch(config: ml_collections.ConfigDict) -> int:
  """This process's share of train.batch_size, which must split over processes and devices."""
  return config_checks.check_batch_split(
    config.train.batch_size, "train.batch_size", jax.process_count(), jax.device_count()
  )


def first_train_step(
  config: ml_collections.ConfigDict, num_batches: int = 2, pipeline: bool | None = None
):
  """(state after one step, jitted train step, `num_batches` random device batches, seconds to
  the end of that first step, compiling and initializing included) of the configured model."""
  batch_size = _local_batch(config)
  logging.info(
    "bench: compiling the train step of %s (batch %d)", train_lib.model_name(config), batch_size
  )
  start = time.perf_counter()  # The step compiles in the memory check (fresh_train_step).
  mesh, state, step_fn = fresh_train_step(config, num_batches, pipeline)
  sharding = train_lib.batch_shardings(mesh)
  batches = [
    jax.device_put(random_batch(config, batch_size, seed=i), sharding) for i in range(num_batches)
  ]
  memory.check_step(config, step_fn, (state, batches[0]), "train")
  state, _ = step_fn(state, batches[0])
  jax.block_until_ready(state)
  return state, step_fn, batches, time.perf_counter() - start


def time_train_step(config: ml_collections.ConfigDict) -> dict:
  """Median step time of the jitted train step after warm-up (single process). End to end
  (config.bench.end_to_end), windows of bare steps alternate with windows of steps fed from
  synthetic shards of the real shapes through the input pipeline, which runs only in the latter."""
  state, step_fn, batches, compile_s = first_train_step(config)
  warmup, steps, end_to_end = config.bench.warmup_steps, config.bench.steps, config.bench.end_to_end
  logging.info(
    "bench: bare step: first step %.1f s (compiling, initializing); %d warm-up, %d timed steps%s",
    compile_s,
    warmup,
    steps,
    " in windows alternating with as many steps end to end" if end_to_end else "",
  )
  step_metrics = None

  def step(batch) -> None:
    nonlocal state, step_metrics
    state, step_metrics = step_fn(state, batch)
    jax.block_until_ready(state)

  bare = lambda i: step(batches[i % len(batches)])
  timing = {"first_step_s": compile_s}
  if not end_to_end:
    times = timed_steps(bare, warmup, steps, "bare step")
  else:
    local = _local_batch(config)
    logging.info("bench: end to end: writing %d synthetic videos", 2 * local)
    with synthetic_train_shards(config, local) as pattern:
      results = alternate(bare, fed_steps(config, pattern, step), warmup, windows(steps))
    times, fed_times = [t for b, _ in results for t in b], [t for _, f in results for t in f]
    ratios = [statistics.median(b) / statistics.median(f) for b, f in results]
    timing.update(end_to_end_s=statistics.median(fed_times), ratios=ratios)
  timing.update(
    step_s=statistics.median(times),
    min_step_ms=1e3 * min(times),
    max_step_ms=1e3 * max(times),
    final_loss=float(step_metrics["loss"]),
  )
  return timing


def fed_steps(config: ml_collections.ConfigDict, pattern: str, step):
  """alternate()'s fed_steps: fed_steps(seed) is a context manager giving fed(i), which runs
  step(batch) on the next batch read from `pattern` through the input pipeline. The reader, and
  its threads, live only inside it: the next bare window has the CPU to itself."""
  input_pipeline, _ = _end_to_end_modules()
  local, mesh = _local_batch(config), train_lib.make_mesh()

  @contextlib.contextmanager
  def window(seed: int):
    reader = input_pipeline.make_train_iterator(config, pattern, seed, local)
    try:
      yield lambda i: step(input_pipeline.to_global(next(reader), mesh))
    finally:
      reader.close()

  return window


# Timed steps per window of the end-to-end measurement (at most), each window after WINDOW_UNTIMED
# untimed steps: a fed window's input pipeline starts then, and fills its buffers.
WINDOW_TIMED, WINDOW_UNTIMED = 7, 2


def windows(steps: int) -> list[int]:
  """`steps` timed steps as the fewest windows of at most WINDOW_TIMED, as even as can be."""
  rounds = -(-steps // WINDOW_TIMED)
  return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def alternate(bare, fed_steps, warmup: int, sizes: list[int]) -> list[tuple[list, list]]:
  """Each round's (bare step times, fed step times): after `warmup` bare steps, for each size a
  window of bare(i) steps then one of fed(i) steps, timing `size` steps of each after
  WINDOW_UNTIMED untimed ones (the first fed window after `warmup` more). fed_steps(round) is a
  context manager giving fed(i), whose input pipeline runs only inside it: tf.data filling its
  buffers during a bare window would slow the bare steps and serve the next fed ones from stock.
  Both windows of a round see the machine at the same speed, however it drifts."""
  timed_steps(bare, warmup, 0, "bare step")
  results, last_line = [], time.perf_counter()
  for r, size in enumerate(sizes):
    b = timed_steps(bare, WINDOW_UNTIMED, size, "bare step")
    with fed_steps(r) as fed:
      f = timed_steps(fed, WINDOW_UNTIMED + (warmup if r == 0 else 0), size, "end to end")
    results.append((b, f))
    if r in (0, len(sizes) - 1) or time.perf_counter() - last_line >= 30.0:
      last_line = time.perf_counter()
      bare_ms, fed_ms = 1e3 * statistics.median(b), 1e3 * statistics.median(f)
      logging.info(
        "bench: round %d of %d: bare step %.1f ms, end to end %.1f ms (%.3f)",
        *(r + 1, len(sizes), bare_ms, fed_ms, bare_ms / fed_ms),
      )
  return results


def timed_steps(step, untimed: int, timed: int, what: str, every_s: float = 30.0) -> list[float]:
  """Seconds each of `timed` calls of step(i) took, after `untimed` warm-up calls; a progress
  line every `every_s` seconds (logged after a step's time is taken, so outside it)."""
  times, last = [], time.perf_counter()
  for i in range(untimed + timed):
    start = time.perf_counter()
    step(i)
    end = time.perf_counter()
    if i >= untimed:
      times.append(end - start)
    if end - last >= every_s:
      last = end
      so_far = f", median {1e3 * statistics.median(times):.1f} ms" if times else " (warm-up)"
      logging.info("bench: %s: %d of %d steps%s", what, i + 1, untimed + timed, so_far)
  return times


@contextlib.contextmanager
def synthetic_train_shards(config: ml_collections.ConfigDict, batch_size: int):
  """Yields the glob of temporary synthetic train shards of the configured format: two batches
  of videos of exactly max_frames frames, so the step sees the bare-step figure's shapes."""
  _, synthetic = _end_to_end_modules()
  frames = max(train_lib.frames_per_example(config), 1)
  with (
    tempfile.TemporaryDirectory(prefix="mfb_jax_bench_") as data_dir,
    contextlib.redirect_stdout(sys.stderr),  # The writer's progress: stdout is the JSON line's.
  ):
    synthetic.write_dataset(
      data_dir,
      num_train=2 * batch_size,
      num_eval=0,
      num_shards=4,
      seed=config.seed,
      num_classes=config.data.num_classes,
      frames=(frames, frames),
      fmt=config.data.format,
    )
    yield os.path.join(data_dir, "train-*")


def _end_to_end_modules():
  """(input_pipeline, synthetic), imported here: only the end-to-end figure needs TensorFlow."""
  try:
    from mfb_jax import input_pipeline, synthetic
  except ModuleNotFoundError as e:
    raise ConfigError(
      f"the end-to-end figure reads tfrecords and needs {e.name}, which is not installed; "
      "--config.bench.end_to_end=False measures the bare step alone"
    ) from e
  return input_pipeline, synthetic


def run_bench(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Measures and prints one JSON line; returns the same record."""
  del workdir  # Nothing is written: the benchmark needs no data files.
  end_to_end = config.bench.end_to_end
  if end_to_end:
    _end_to_end_modules()  # Before minutes of timing, not after.
  timing = time_train_step(config)
  batch_size = config.train.batch_size
  flops_per_example = flops.train_flops_per_example(config)
  peak_dtype = "bfloat16" if config.model.dtype == "bfloat16" else "float32"
  logging.info(
    "bench: step %.1f ms; measuring the %s matmul peak", 1e3 * timing["step_s"], peak_dtype
  )
  peak_gflops = flops.measure_matmul_peak(peak_dtype)
  floor = peak_gflops * 1e9 / flops_per_example
  examples_per_sec = batch_size / timing["step_s"]
  record = {
    "model": train_lib.model_name(config),
    "examples_per_sec": round(examples_per_sec, 2),
    # Microseconds: a tiny model's step can take well under a millisecond.
    "step_ms": round(1e3 * timing["step_s"], 3),
    "min_step_ms": round(timing["min_step_ms"], 3),
    "max_step_ms": round(timing["max_step_ms"], 3),
    "first_step_s": round(timing["first_step_s"], 2),
    "batch_size": batch_size,
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
    "device_kind": jax.devices()[0].device_kind,
    "train_flops_per_example": flops_per_example,
    "matmul_peak_gflops": round(peak_gflops, 1),
    "flop_floor_examples_per_sec": round(floor, 1),
    "fraction_of_floor": round(examples_per_sec / floor, 3),
    "peak_host_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "steps_timed": config.bench.steps,
    # The process set-up the figure was measured with (launch.py applies both: mfb_jax/runtime.py).
    "allocator": "tcmalloc" if runtime.tcmalloc_loaded() else "system",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "matmul_precision": jax.config.jax_default_matmul_precision or "default",
    "jax_version": jax.__version__,
  }
  if end_to_end:
    record["end_to_end_examples_per_sec"] = round(batch_size / timing["end_to_end_s"], 2)
    # Each round's bare / end-to-end ratio: alternating windows cancel the machine's drift.
    record["end_to_end_vs_bare_step"] = round(statistics.median(timing["ratios"]), 3)
    record["end_to_end_round_ratios"] = [round(r, 3) for r in timing["ratios"]]
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)
  return record
