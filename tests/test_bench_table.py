"""scripts/bench_table.py: one bench process per row, records kept as measured, the table."""

import datetime
import importlib.util
import json
import os
import types

from conftest import REPO, run_python

ARGS = types.SimpleNamespace(end_to_end="mfb", steps=0, warmup_steps=0, set=["train.batch_size=64"])


def test_rows_are_measured_recorded_and_tabled(tmp_path):
  out = tmp_path / "rows.jsonl"
  args = ["--steps=2", "--warmup_steps=1", "--end_to_end=mfb", f"--out={out}"]
  result = run_python(["scripts/bench_table.py", "configs/tiny.py", *args], timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record["row"] == "configs/tiny.py float32" and record["steps_timed"] == 2
  assert "--config.model.dtype=float32" in record["command"]
  assert record["commit"] != "" and record["host_cores"] == os.cpu_count()
  assert record["measured_at"].startswith(str(datetime.date.today().year))
  lines = result.stdout.splitlines()
  assert lines[0].startswith("Measured ") and " at commit " in lines[0]
  cells = [c.strip() for c in lines[-1].strip("|").split("|")]
  assert len(cells) == len(lines[-3].strip("|").split("|")) == 9  # Row and header agree.
  assert cells[0] == record["model"] == "netvlad+mfb+moe"
  assert float(cells[1]) == round(record["examples_per_sec"], 1)
  # Only MFB rows of configs/paper.py get the end-to-end figure (test_bench.py covers it).
  assert cells[7] == "" and "end_to_end_examples_per_sec" not in record
  assert "--config.bench.end_to_end=False" in record["command"]


def test_a_failed_row_is_recorded_and_the_budget_skips_the_rest(tmp_path):
  out = tmp_path / "rows.jsonl"
  rows = ["configs/missing.py", "configs/tiny.py"]
  result = run_python(["scripts/bench_table.py", *rows, "--budget_s=0.01", f"--out={out}"])
  assert result.returncode == 1  # A row failed.
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record["error"] == "exit 2: error: config file not found: configs/missing.py"
  assert "configs/tiny.py float32: skipped (--budget_s=0.01)" in result.stderr
  assert result.stdout.splitlines()[-1] == (
    "| configs/missing.py float32 | failed: exit 2: error: config file not found: "
    "configs/missing.py |"
  )


def test_a_row_with_the_end_to_end_figure():
  spec = importlib.util.spec_from_file_location("bench_table", REPO / "scripts" / "bench_table.py")
  bench_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_table)
  record = {
    "model": "netvlad+mfb+moe",
    "examples_per_sec": 394.94,
    "step_ms": 324.1,
    "train_flops_per_example": 367_300_000,
    "flop_floor_examples_per_sec": 874.4,
    "fraction_of_floor": 0.4517,
    "peak_host_memory_mb": 2418.3,
    "end_to_end_examples_per_sec": 350.04,
    "end_to_end_vs_bare_step": 0.886,
    "matmul_peak_gflops": 321.2,
  }
  assert bench_table.table_row(record) == (
    "| netvlad+mfb+moe | 394.9 | 324 | 0.367 | 874 | 45% | 2418 | 350.0 (0.89) | 321 |"
  )
  command = bench_table.row_command("python", "configs/paper.py:dbof,mfb", "bfloat16", ARGS)
  assert "--config.bench.end_to_end=True" in command  # An MFB row of the paper's grid.
  assert "--config.model.dtype=bfloat16" in command and "--config.train.batch_size=64" in command


def test_impossible_limits_are_refused_before_any_row():
  """--budget_s=-1 skipped every row and exited 0."""
  for flag in ("--budget_s=-1", "--row_timeout_s=0", "--steps=-2"):
    result = run_python(["scripts/bench_table.py", flag])
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()  # One line, no usage text before it.
    assert line.startswith(f"error: {flag} must be ") and line.endswith(
      "(--help lists the options)"
    )
