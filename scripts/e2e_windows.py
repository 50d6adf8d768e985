r"""The bench mode's end-to-end ratio, measured in alternating windows of one process.

  .venv/bin/python scripts/e2e_windows.py --config=configs/paper.py:netvlad,mfb [--rounds=5]

`launch.py --mode=bench` times the bare step, then the step fed by the input pipeline; where the
machine's speed drifts between the two (other virtual machines on the host), the ratio drifts
with it. Here, after warm-up, windows of --steps bare steps (in-memory batches) alternate with
windows of as many steps fed from synthetic tfrecords through the input pipeline, --rounds
times, in one process. It prints one JSON line: each window's median step (ms) and the median
of the rounds' ratios (bare / end to end). Like launch.py it runs with tcmalloc and the project's
XLA flags.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mfb_jax import cli, runtime  # noqa: E402

cli.define_config_file(None, "Config file (launch.py's).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Pairs of windows (bare, end to end).")
_STEPS = flags.DEFINE_integer("steps", 12, "Steps per window; its first 2 are not counted.")


def measure(config, rounds: int, steps: int) -> dict:
  import jax

  from mfb_jax import bench, input_pipeline
  from mfb_jax import train as train_lib

  state, step_fn, batches, _ = bench.first_train_step(config)
  size, mesh = config.train.batch_size, train_lib.make_mesh()
  with bench.synthetic_train_shards(config, size) as pattern:
    read = input_pipeline.make_train_iterator(config, pattern, seed=0, local_batch_size=size)

    def window(end_to_end: bool) -> float:
      nonlocal state
      times = []
      for i in range(steps):
        start = time.perf_counter()
        batch = input_pipeline.to_global(next(read), mesh) if end_to_end else batches[i % 2]
        state, _ = step_fn(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
      return statistics.median(times[2:])

    window(True)  # Warm-up: the shuffle buffer fills, tf.data's threads start.
    bare, fed = [], []
    for _ in range(rounds):
      bare.append(window(False))
      fed.append(window(True))
  ratios = [b / e for b, e in zip(bare, fed, strict=True)]
  return {
    "model": train_lib.model_name(config),
    "bare_step_ms": [round(1e3 * t, 3) for t in bare],
    "end_to_end_step_ms": [round(1e3 * t, 3) for t in fed],
    "ratios": [round(r, 3) for r in ratios],
    "end_to_end_vs_bare_step": round(statistics.median(ratios), 3),
    "allocator": "tcmalloc" if runtime.tcmalloc_loaded() else "default",
  }


def main(argv) -> None:
  """Bad flags, configs and values are one line with exit code 2, as in launch.py."""
  cli.no_positional_arguments(argv)
  if _ROUNDS.value < 1 or _STEPS.value < 3:
    cli.fail(f"--rounds={_ROUNDS.value} and --steps={_STEPS.value}: at least 1 and 3")
  config = cli.config()
  runtime.preload_tcmalloc()
  runtime.set_xla_cpu_flags()
  runtime.quiet_library_logs()
  from mfb_jax import config_checks
  from mfb_jax.errors import UserError

  try:
    config_checks.validate(config, "bench")
    print(json.dumps(measure(config, _ROUNDS.value, _STEPS.value)), flush=True)
  except UserError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
