r"""Where the train step's time goes: each compiled operation's time per step, from a trace.

  python -m mfb_jax.step_profile --config=configs/paper.py:netvlad,mfb [--steps=3] [--top=25]

Runs the configured model's jitted train step as `launch.py --mode=bench` does (fresh state,
random in-memory batches of the real shapes, warm-up first), traces --steps steps with
jax.profiler and prints one line per operation of the compiled step: XLA's name for it (a fusion,
a dot, a copy), its time per step summed over the threads that ran it, its share of that sum,
its output shape and its first operands in the optimized HLO. Adam's updates show up as fusions
of `state_opt_state_...` and `state_params_...` operands with a parameter's shape. Like launch.py
it runs with tcmalloc and the project's XLA flags; run it with nothing else busy, before and after
changing a hot path. Checked on XLA:CPU, whose trace names every operation it runs.

What the times cover: the time each operation held the thread that ran it. Fusions and YNNPACK
dots ("ynn_fusion") run their work inside that time, split over the threads; XLA's Eigen dots
("dot.N") run asynchronously on the intra-op pool, so they show little more than their launch, and
their work is the gap between the attributed sum and cores x wall time (printed at the end).
"""

import dataclasses
import glob
import os
import re
import statistics
import tempfile
import time
from collections import Counter

from absl import app, flags

from mfb_jax import cli, runtime

FLAGS = flags.FLAGS
# One HLO instruction: "%name = shape op(operands), ..." (the % is optional in newer dumps).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ([\w\-]+)\(([^)]*)\)", re.M)


@dataclasses.dataclass(frozen=True)
class OpTime:
  name: str
  ms_per_step: float  # Summed over the threads that ran it.
  shape: str
  operands: tuple[str, ...]


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
  """name -> (output shape, operand names) of every instruction in an HLO module's text."""
  out = {}
  for name, shape, _, operands in _INSTRUCTION.findall(hlo_text):
    names = tuple(o.strip().lstrip("%") for o in operands.split(",") if o.strip())
    out[name] = (shape, names)
  return out


def op_times(xspace_bytes: bytes, instructions: dict, steps: int) -> list[OpTime]:
  """Per-step time of each traced event named like an HLO instruction, slowest first."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  space = xplane_pb2.XSpace()
  space.ParseFromString(xspace_bytes)
  total_ps = Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if name in instructions:
          total_ps[name] += event.duration_ps
  return [
    OpTime(name, ps / 1e9 / steps, *instructions[name]) for name, ps in total_ps.most_common()
  ]


def profile_step(config, steps: int) -> tuple[list[OpTime], float]:
  """(operation times per step, median wall time of a traced step in ms) of the configured step."""
  import jax

  from mfb_jax import bench
  from mfb_jax.errors import ConfigError

  if steps < 1:
    raise ConfigError(f"--steps={steps}; it must be at least 1")
  state, step_fn, (batch,), _ = bench.first_train_step(config, num_batches=1, pipeline=False)
  for _ in range(config.bench.warmup_steps):
    state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  instructions = hlo_instructions(step_fn.lower(state, batch).compile().as_text())
  walls = []
  with tempfile.TemporaryDirectory(prefix="mfb_jax_profile_") as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      start = time.perf_counter()
      state, _ = step_fn(state, batch)
      jax.block_until_ready(state)
      walls.append(1e3 * (time.perf_counter() - start))
    jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not traces:
      raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    with open(traces[0], "rb") as f:
      rows = op_times(f.read(), instructions, steps)
  if not rows:
    raise RuntimeError("the trace names no operation of the compiled step (not XLA:CPU?)")
  return rows, statistics.median(walls)


def format_table(rows: list[OpTime], wall_ms: float, top: int, cores: int) -> str:
  total = sum(r.ms_per_step for r in rows)
  lines = [f"{'ms/step':>9} {'share':>6}  {'operation':<30} {'shape':<24} operands"]
  for r in rows[:top]:
    operands = ", ".join(o[:40] for o in r.operands[:3])
    share = 100 * r.ms_per_step / total
    lines.append(f"{r.ms_per_step:9.2f} {share:5.1f}%  {r.name:<30} {r.shape:<24} {operands}")
  lines.append(
    f"{total:9.2f} thread-ms per step attributed to {len(rows)} operations (shown: "
    f"{min(top, len(rows))}); step wall time {wall_ms:.1f} ms (median of the traced steps) on "
    f"{cores} cores = {cores * wall_ms:.0f} core-ms; the rest is asynchronous dots' work and idle"
  )
  return "\n".join(lines)


def _define_flags() -> None:
  cli.define_config_file("configs/default.py", "Config file (configs/X.py).")
  flags.declare_key_flag("config")  # Listed by --help, not only by --helpfull.
  flags.DEFINE_integer("steps", 3, "Traced steps (after the config's bench.warmup_steps).")
  flags.DEFINE_integer("top", 30, "Operations printed, slowest first.")


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  if FLAGS.top < 1:  # Before the minute of tracing: -2 printed all but the last two.
    cli.fail(f"--top={FLAGS.top}; it must be at least 1")
  cli.config(FLAGS)  # Loaded (the default configs/default.py is relative to the working directory).
  runtime.preload_tcmalloc(module=__spec__.name)
  runtime.set_xla_cpu_flags()
  runtime.quiet_library_logs()
  from mfb_jax import config_checks
  from mfb_jax.errors import UserError

  try:
    config_checks.validate(FLAGS.config, "bench")
    runtime.set_matmul_precision(FLAGS.config)  # As launch.py does.
    rows, wall_ms = profile_step(FLAGS.config, FLAGS.steps)
  except (UserError, OSError) as e:  # OSError: the config file failed to load.
    cli.fail(str(e))
  print(format_table(rows, wall_ms, FLAGS.top, os.cpu_count() or 1), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
