r"""Runs `launch.py --mode=bench` for several models and dtypes; prints BENCHMARKS.md's table rows.

  .venv/bin/python scripts/bench_table.py                       # the 9 paper models, float32
  .venv/bin/python scripts/bench_table.py --dtypes=float32,bfloat16 --out=rows.jsonl
  python3 scripts/bench_table.py --end_to_end=none --budget_s=420 configs/paper.py:netvlad,mfb

Each row is its own `launch.py --mode=bench` process (so each reports its own peak host memory),
run one after another; its JSON line is appended to --out as soon as it is measured, so a run cut
short keeps what it measured. --budget_s starts no new row once that many seconds have passed
(for a lent accelerator with minutes of time: the default order puts NetVLAD+MFB and DBoF+MFB,
the models with targets, first). Progress goes to stderr; the table, preceded by when and where it
was measured, to stdout.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mfb_jax import cli  # noqa: E402 - one-line flag errors; imports neither JAX nor TensorFlow.

# The paper's 9 models, those with throughput targets first.
PAPER = [
  f"configs/paper.py:{cell}"
  for cell in (
    "netvlad,mfb",
    "dbof,mfb",
    "avgpool,mfb",
    "avgpool,concat",
    "avgpool,fc_concat",
    "netvlad,concat",
    "netvlad,fc_concat",
    "dbof,concat",
    "dbof,fc_concat",
  )
]
COLUMNS = (
  "model | examples/sec | step ms | train GFLOP / example | floor ex/s | % of floor | "
  "peak host MB | end to end ex/s (/ bare step) | peak GFLOP/s"
)


def row_command(python: str, config: str, dtype: str, args) -> list[str]:
  end_to_end = args.end_to_end == "all" or (args.end_to_end == "mfb" and config.endswith(",mfb"))
  cmd = [python, "launch.py", "--mode=bench", f"--config={config}"]
  cmd += [f"--config.model.dtype={dtype}", f"--config.bench.end_to_end={end_to_end}"]
  if args.steps:
    cmd.append(f"--config.bench.steps={args.steps}")
  if args.warmup_steps:
    cmd.append(f"--config.bench.warmup_steps={args.warmup_steps}")
  return cmd + [f"--config.{setting}" for setting in args.set]


def run_row(cmd: list[str], timeout_s: float) -> dict:
  """The row's JSON record, or {'error': why} (its last stderr line)."""
  try:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"no result within {timeout_s:.0f} s"}
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode != 0 or not lines:
    last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    return {"error": f"exit {result.returncode}: {last}"}
  return json.loads(lines[-1])


def table_row(record: dict) -> str:
  if "error" in record:
    return f"| {record['row']} | failed: {record['error']} |"
  end_to_end = ""
  if "end_to_end_examples_per_sec" in record:
    e2e, ratio = record["end_to_end_examples_per_sec"], record["end_to_end_vs_bare_step"]
    end_to_end = f"{e2e:.1f} ({ratio:.2f})"
  cells = (
    record["model"],
    f"{record['examples_per_sec']:.1f}",
    f"{record['step_ms']:.0f}" if record["step_ms"] >= 10 else f"{record['step_ms']:.2f}",
    f"{record['train_flops_per_example'] / 1e9:.3f}",
    f"{record['flop_floor_examples_per_sec']:.0f}",
    f"{100 * record['fraction_of_floor']:.0f}%",
    f"{record['peak_host_memory_mb']:.0f}",
    end_to_end,
    f"{record['matmul_peak_gflops']:.0f}",
  )
  return "| " + " | ".join(cells) + " |"


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    names = []
  return names[0] if names else platform.machine()


def git_commit() -> str:
  result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
  return result.stdout.decode().strip() or "unknown"


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="*", default=PAPER, help="config specs (default: paper's 9)")
  parser.add_argument("--dtypes", default="float32", help="comma-separated config.model.dtype")
  parser.add_argument("--end_to_end", choices=["mfb", "all", "none"], default="mfb")
  parser.add_argument("--steps", type=int, default=0, help="config.bench.steps (0: the config's)")
  parser.add_argument("--warmup_steps", type=int, default=0, help="0: the config's")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE: --config.KEY=VALUE")
  parser.add_argument("--budget_s", type=float, default=0, help="no new row after this (0: none)")
  parser.add_argument("--row_timeout_s", type=float, default=1800)
  parser.add_argument("--out", default="", help="JSONL file the records are appended to")
  args = parser.parse_args()
  for name in ("budget_s", "row_timeout_s", "steps", "warmup_steps"):
    if not getattr(args, name) >= 0 or (name == "row_timeout_s" and not args.row_timeout_s):
      parser.error(
        f"--{name}={getattr(args, name):g} must be {'> 0' if name == 'row_timeout_s' else '>= 0'}"
      )

  rows = [(config, dtype) for config in args.configs for dtype in args.dtypes.split(",")]
  start, records = time.time(), []
  # In every record too: a run cut short by a time limit leaves its records without the summary.
  where = {"commit": git_commit(), "host_cpu": cpu_name(), "host_cores": os.cpu_count()}
  for i, (config, dtype) in enumerate(rows, 1):
    name = f"{config} {dtype}"
    # The first row always runs: the budget's time includes `git`, slow on a loaded machine.
    if args.budget_s and i > 1 and time.time() - start > args.budget_s:
      print(f"[{i}/{len(rows)}] {name}: skipped (--budget_s={args.budget_s:g})", file=sys.stderr)
      continue
    cmd = row_command(sys.executable, config, dtype, args)
    row_start = time.time()
    record = {**run_row(cmd, args.row_timeout_s), "row": name, "command": " ".join(cmd[1:])}
    record.update(where, measured_at=datetime.datetime.now(datetime.UTC).isoformat("T", "seconds"))
    records.append(record)
    took = time.time() - row_start
    done = record.get("error") or f"{record['examples_per_sec']:.1f} ex/s"
    print(f"[{i}/{len(rows)}] {name}: {done} ({took:.0f} s)", file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")

  now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  kinds = sorted({f"{r['platform']} ({r['device_kind']})" for r in records if "error" not in r})
  print(
    f"Measured {now} at commit {where['commit']} on {', '.join(kinds) or 'nothing'}, host "
    f"{where['host_cpu']} with {where['host_cores']} cores; one "
    "`launch.py --mode=bench` process per row (`scripts/bench_table.py`)."
  )
  print(f"\n| {COLUMNS} |\n|---|" + "---:|" * COLUMNS.count("|"))
  for record in records:
    print(table_row(record))
  failed = sum("error" in r for r in records)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
