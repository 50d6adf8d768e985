r"""Measures mfb-jax's train step against the PyTorch and TensorFlow peers, in one run.

  .venv/bin/python scripts/compare_peers.py --peers_dir=../shared/peers \
    --torch_python=/path/to/venv_with_torch/bin/python [--models=netvlad_mfb,dbof_mfb] [--bf16]

The peers (reference implementations of the same step, kept outside this project) print
`examples_per_sec=X`; mfb-jax is measured with `launch.py --mode=bench`. Runs are interleaved
(jax, torch, tf per model, repeated) so machine noise hits all of them alike; the table reports
the median of the repeats and mfb-jax's ratio to each implementation (to itself: 1.00x).
Figures are only comparable within one run: these 2-core machines are not all the same CPU.
"""

import os
import shutil
import statistics
import subprocess
import sys
import types

import bench_table  # scripts/, beside this file; it puts the repository on sys.path.

from mfb_jax import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
CELLS = {"netvlad_mfb": "netvlad,mfb", "dbof_mfb": "dbof,mfb"}


def _run(cmd: list[str], env: dict | None = None) -> str:
  result = subprocess.run(
    cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True
  )
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip().splitlines()[-1:]}")
  return result.stdout


def jax_bench(model: str, bf16: bool, steps: int) -> float:
  """mfb-jax's bare step, through bench_table.py's command and parsing of a bench row."""
  args = types.SimpleNamespace(end_to_end="none", steps=steps, warmup_steps=0, set=[])
  config = f"configs/paper.py:{CELLS[model]}"
  cmd = bench_table.row_command(sys.executable, config, "bfloat16" if bf16 else "float32", args)
  record = bench_table.run_row(cmd, timeout_s=1800)
  if "error" in record:
    raise RuntimeError(f"{' '.join(cmd)} failed: {record['error']}")
  return record["examples_per_sec"]


def peer_bench(python: str, script: str, args: list[str], steps: int) -> float:
  env = {"LD_PRELOAD": TCMALLOC} if os.path.exists(TCMALLOC) else {}
  out = _run([python, script, *args, "--steps", str(steps)], env=env)
  line = [x for x in out.splitlines() if x.startswith("examples_per_sec=")][-1]
  return float(line.split("=")[1])


def main() -> None:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--peers_dir", default=os.path.join(REPO, "..", "shared", "peers"))
  parser.add_argument("--torch_python", default=None, help="a python with torch installed")
  parser.add_argument("--models", default="netvlad_mfb,dbof_mfb")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--bf16", action="store_true", help="bf16 for mfb-jax and torch autocast")
  args = parser.parse_args()
  # Checked now, not after minutes of benchmarks. The peers are not part of this repository.
  needed = (["torch_peer.py"] if args.torch_python else []) + ([] if args.bf16 else ["tf_peer.py"])
  for name in needed:
    if not os.path.isfile(os.path.join(args.peers_dir, name)):
      parser.error(f"--peers_dir={args.peers_dir} has no {name}")
  if args.torch_python and not shutil.which(args.torch_python):
    parser.error(f"--torch_python={args.torch_python}: no such executable")
  unknown = sorted(set(args.models.split(",")) - set(CELLS))
  if unknown:
    parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(CELLS)}")
  if args.repeats < 1 or args.steps < 1:
    parser.error(f"--repeats={args.repeats} and --steps={args.steps} must be >= 1")
  results: dict[tuple[str, str], list[float]] = {}
  for repeat in range(args.repeats):
    for model in args.models.split(","):
      runs = {"mfb-jax": lambda m=model: jax_bench(m, args.bf16, args.steps)}
      if args.torch_python:
        torch_args = ["--model", model, "--mode", "compile", "--adam", "fused"]
        torch_args += ["--bf16"] if args.bf16 else []
        script = os.path.join(args.peers_dir, "torch_peer.py")
        label = "torch compile+fused+tcmalloc" + (", bf16 autocast" if args.bf16 else "")
        runs[label] = lambda a=torch_args, s=script: peer_bench(args.torch_python, s, a, args.steps)
      if not args.bf16:
        script = os.path.join(args.peers_dir, "tf_peer.py")
        runs["tf jit+tcmalloc"] = lambda m=model, s=script: peer_bench(
          sys.executable, s, ["--model", m, "--mode", "jit"], args.steps
        )
      for name, fn in runs.items():
        value = fn()
        results.setdefault((model, name), []).append(value)
        print(f"[{repeat + 1}/{args.repeats}] {model:12s} {name:30s} {value:8.1f} ex/s", flush=True)
  print("\n| model | implementation | examples/sec (median) | mfb-jax / this |")
  print("|---|---|---:|---:|")
  for model in args.models.split(","):
    ours = statistics.median(results[(model, "mfb-jax")])
    for (m, name), values in results.items():
      if m == model:
        value = statistics.median(values)
        print(f"| {model} | {name} | {value:.1f} | {ours / value:.2f}x |")


if __name__ == "__main__":
  main()
