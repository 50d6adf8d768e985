r"""The bench mode's end-to-end ratio, with the rounds and window length chosen.

  .venv/bin/python scripts/e2e_windows.py --config=configs/paper.py:netvlad,mfb [--rounds=5]

`launch.py --mode=bench` alternates windows of bare steps (in-memory batches) with windows of
steps fed from synthetic tfrecords through the input pipeline, in one process, so that both see
the machine at the same speed however it drifts (the input pipeline runs only in the fed
windows): rounds of up to 7 counted steps each, as many as config.bench.steps needs (3 by
default). Here --rounds sets the rounds and --steps each window's length (its first 2 steps are
not counted). It prints one JSON line: each window's
median step (ms) and the median of the rounds' ratios (bare / end to end). Like launch.py it
runs with tcmalloc and the project's XLA flags.
"""

import json
import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mfb_jax import cli, runtime  # noqa: E402

cli.define_config_file(None, "Config file (launch.py's).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Pairs of windows (bare, end to end).")
_STEPS = flags.DEFINE_integer("steps", 12, "Steps per window; its first 2 are not counted.")


def measure(config, rounds: int, steps: int) -> dict:
  import jax

  from mfb_jax import bench
  from mfb_jax import train as train_lib

  state, step_fn, batches, _ = bench.first_train_step(config, pipeline=True)

  def step(batch) -> None:
    nonlocal state
    state, _ = step_fn(state, batch)
    jax.block_until_ready(state)

  with bench.synthetic_train_shards(config, config.train.batch_size) as pattern:
    bare = lambda i: step(batches[i % 2])
    fed_steps = bench.fed_steps(config, pattern, step)
    # Warm-up: a window's worth (the first fed window's shuffle buffer fills, threads start).
    counted = steps - bench.WINDOW_UNTIMED
    results = bench.alternate(bare, fed_steps, steps, [counted] * rounds)
  bare_ms = [1e3 * statistics.median(b) for b, _ in results]
  fed_ms = [1e3 * statistics.median(f) for _, f in results]
  ratios = [b / f for b, f in zip(bare_ms, fed_ms, strict=True)]
  return {
    "model": train_lib.model_name(config),
    "bare_step_ms": [round(t, 3) for t in bare_ms],
    "end_to_end_step_ms": [round(t, 3) for t in fed_ms],
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
