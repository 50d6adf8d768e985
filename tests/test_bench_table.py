"""scripts/bench_table.py: one bench process per row, records kept as measured, the table."""

import json

from conftest import run_python


def test_rows_are_measured_recorded_and_tabled(tmp_path):
  out = tmp_path / "rows.jsonl"
  args = ["--steps=2", "--warmup_steps=1", "--end_to_end=all", f"--out={out}"]
  result = run_python(["scripts/bench_table.py", "configs/tiny.py", *args], timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record["row"] == "configs/tiny.py float32" and record["steps_timed"] == 2
  assert "--config.model.dtype=float32" in record["command"]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("Measured ") and " at commit " in lines[0]
  cells = [c.strip() for c in lines[-1].strip("|").split("|")]
  assert len(cells) == len(lines[-3].strip("|").split("|")) == 9  # Row and header agree.
  assert cells[0] == record["model"] == "netvlad+mfb+moe"
  assert float(cells[1]) == round(record["examples_per_sec"], 1)
  e2e = record["end_to_end_examples_per_sec"]
  assert cells[7] == f"{e2e:.1f} ({record['end_to_end_vs_bare_step']:.2f})"


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
