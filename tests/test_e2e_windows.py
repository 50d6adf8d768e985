"""scripts/e2e_windows.py: bare and input-fed windows alternate in one process; the ratio."""

import json
import statistics

from conftest import run_python


def test_windows_alternate_and_the_ratio_is_their_rounds_median():
  args = ["--config=configs/tiny.py", "--rounds=3", "--steps=4"]
  result = run_python(["scripts/e2e_windows.py", *args], timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  bare, fed = record["bare_step_ms"], record["end_to_end_step_ms"]
  assert len(bare) == len(fed) == len(record["ratios"]) == 3 and min(bare + fed) > 0
  for ratio, b, f in zip(record["ratios"], bare, fed, strict=True):
    assert abs(ratio - b / f) < 0.002 + 0.01 * ratio
  assert record["end_to_end_vs_bare_step"] == statistics.median(record["ratios"])
  assert record["model"] == "netvlad+mfb+moe"


def test_bad_flags_are_refused():
  result = run_python(["scripts/e2e_windows.py", "--config=configs/tiny.py", "--rounds=0"])
  assert result.returncode != 0 and "usage: e2e_windows.py" in result.stderr
