"""--mode=bench through launch.py: the JSON line, and the bare step without TensorFlow."""

import contextlib
import json
from importlib import metadata

import pytest
from conftest import REPO, last_line, run_python

from mfb_jax import bench, runtime


def test_bench_prints_one_json_line_with_the_contract_keys():
  # The bench mode writes nothing, so it needs no --workdir (the other modes do).
  result = run_python(["launch.py", f"--config={REPO / 'configs' / 'tiny.py'}", "--mode=bench"])
  assert result.returncode == 0, result.stderr[-2000:]
  # Only the JSON line: the end-to-end figure's shard writer reports its progress on stderr.
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  record = json.loads(lines[0])
  assert record["model"] == "netvlad+mfb+moe" and record["batch_size"] == 8
  assert record["devices"] == 1 and record["examples_per_sec"] > 0
  # Both come from the median step; step_ms is rounded to the microsecond (this step can be 0.3 ms).
  assert 8000 / record["examples_per_sec"] == pytest.approx(record["step_ms"], abs=6e-4, rel=1e-4)
  assert record["train_flops_per_example"] > 0 and record["flop_floor_examples_per_sec"] > 0
  assert 0 < record["end_to_end_examples_per_sec"]
  # Progress on stderr, in order: a paper model's bench is minutes of compiling and stepping.
  progress = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] bench: " in line]
  assert [line.split(":")[1].strip().split()[0] for line in progress] == [
    "compiling",  # Memory checked, step compiled: only then are the synthetic shards written.
    "bare",
    "end",  # Writing the synthetic shards.
    "round",  # configs/tiny.py times 2 steps: one round of a bare and an end-to-end window.
    "step",
  ], progress
  assert record["end_to_end_round_ratios"] == [record["end_to_end_vs_bare_step"]]
  # launch.py applies the XLA:CPU flags itself (and tcmalloc where it is installed).
  if metadata.version("jaxlib").startswith(runtime.XLA_CPU_FLAGS_VERIFIED_ON):
    assert "--xla_cpu_copy_insertion_use_region_analysis=true" in record["xla_flags"]
  wanted = runtime.tcmalloc_library() and not runtime.opted_out("MFB_JAX_NO_TCMALLOC")
  assert record["allocator"] == ("tcmalloc" if wanted else "system")
  assert record["matmul_precision"] == "float32"  # Full float32 products, also on GPUs.
  assert record["jax_version"] == metadata.version("jax")


# launch.py run as on a machine without TensorFlow (an accelerator machine may lack it).
WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules["tensorflow"] = None  # import tensorflow now fails as if it were not installed.
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_the_bare_step_bench_needs_no_tensorflow():
  env = {"MFB_JAX_NO_TCMALLOC": "1"}  # Its re-execution would drop the blocker above.
  args = ["-c", WITHOUT_TENSORFLOW, "--config=configs/tiny.py", "--mode=bench"]
  result = run_python([*args, "--config.bench.end_to_end=False"], env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(result.stdout)
  assert record["examples_per_sec"] > 0 and "end_to_end_examples_per_sec" not in record
  # The end-to-end figure does need it: one line, before any timing.
  result = run_python(args, env=env)
  assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
  assert last_line(result.stderr) == (
    "error: the end-to-end figure reads tfrecords and needs tensorflow, which is not "
    "installed; --config.bench.end_to_end=False measures the bare step alone"
  )


def test_timed_steps_time_only_the_steps_after_the_warm_up_and_report_progress(monkeypatch):
  lines, calls = [], []
  monkeypatch.setattr(bench.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  clock = iter(range(100))  # Each perf_counter() call: one second later.
  monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
  times = bench.timed_steps(calls.append, untimed=2, timed=3, what="bare step", every_s=4)
  assert calls == [0, 1, 2, 3, 4] and times == [1.0] * 3
  # Clock 0 at the start; step i starts at 2i + 1 and ends at 2i + 2: lines at ends 4 and 8.
  assert lines == [
    "bench: bare step: 2 of 5 steps (warm-up)",
    "bench: bare step: 4 of 5 steps, median 1000.0 ms",
  ]


def test_alternate_times_windows_of_bare_and_fed_steps_in_turn(monkeypatch):
  lines, calls = [], []
  monkeypatch.setattr(bench.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  clock = iter(range(1000))  # Each perf_counter() call: one second later.
  monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
  bare = lambda i: calls.append(("bare", i))

  @contextlib.contextmanager
  def fed_steps(seed):  # The input pipeline: started and stopped around each fed window.
    calls.append(("start", seed))
    yield lambda i: calls.append(("fed", i))
    calls.append(("stop", seed))

  results = bench.alternate(bare, fed_steps, warmup=1, sizes=[3, 2])
  untimed = bench.WINDOW_UNTIMED
  window = lambda kind, n, extra=0: [(kind, i) for i in range(untimed + extra + n)]
  assert calls == [
    ("bare", 0),  # Warm-up.
    *window("bare", 3),
    ("start", 0),
    *window("fed", 3, extra=1),  # The first fed window warms up too.
    ("stop", 0),
    *window("bare", 2),
    ("start", 1),
    *window("fed", 2),
    ("stop", 1),
  ]
  assert results == [([1.0] * 3, [1.0] * 3), ([1.0] * 2, [1.0] * 2)]  # Untimed steps left out.
  assert lines == [
    "bench: round 1 of 2: bare step 1000.0 ms, end to end 1000.0 ms (1.000)",
    "bench: round 2 of 2: bare step 1000.0 ms, end to end 1000.0 ms (1.000)",
  ]


@pytest.mark.parametrize(
  "steps, sizes", [(1, [1]), (7, [7]), (8, [4, 4]), (20, [7, 7, 6]), (25, [7, 6, 6, 6])]
)
def test_windows_time_exactly_the_steps_asked_for(steps, sizes):
  assert bench.windows(steps) == sizes
