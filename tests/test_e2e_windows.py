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


def test_bad_flags_and_configs_are_one_line_with_exit_code_2():
  # A missing config file, an unknown field or a bad value were tracebacks with exit code 1.
  tiny = "--config=configs/tiny.py"
  for args, line in [
    ([tiny, "--rounds=0"], "error: --rounds=0 and --steps=12: at least 1 and 3"),
    (["--config=configs/nope.py"], "error: config file not found: configs/nope.py"),
    (
      [tiny, "--config.model.dtype=float16"],
      "error: config.model.dtype='float16' is invalid; allowed: float32, bfloat16",
    ),
  ]:
    result = run_python(["scripts/e2e_windows.py", *args])
    assert (result.returncode, result.stderr.strip()) == (2, line)
