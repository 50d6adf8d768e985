r"""Times each matmul of the NetVLAD+MFB+MoE train step alone, on its real shapes.

  .venv/bin/python scripts/step_matmuls.py [--batch=128 --frames=300 --repeats=15]

The analytic floor of `launch.py --mode=bench` divides the step's matmul FLOPs by the rate of a
square 2048 x 2048 matmul. The step's own products are not square: NetVLAD's have K = 8 columns,
and every weight gradient contracts over only the batch (128 rows). This script runs each of them
alone (jitted, random float32 inputs, in the orientation the compiled step uses), prints its
median time and rate, and their sum: a floor for the step measured on its own shapes, which
no implementation built on these kernels can go below (elementwise work and Adam come on top).
Run it with tcmalloc preloaded and nothing else busy, as the bench mode.
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mfb_jax import cli  # noqa: E402

_barrier = jax.lax.optimization_barrier  # Keeps XLA from re-orienting a product.


def products(
  B: int,
  T: int,
  rgb: int = 1024,
  audio: int = 128,
  K: int = 8,
  o: int = 1024,
  k: int = 4,
  C: int = 3862,
  E: int = 2,
):
  """(name, flops, fn, argument shapes) of every matmul of one NetVLAD+MFB+MoE train step."""
  out = []
  for name, F in (("rgb", rgb), ("audio", audio)):
    N = B * T
    out += [
      (f"NetVLAD {name} logits x W", 2 * N * F * K, lambda x, w: x @ w, [(N, F), (F, K)]),
      (
        f"NetVLAD {name} sums a^T x (per video)",
        2 * N * F * K,
        lambda a, x: jnp.einsum("btk,btf->bkf", a, x),
        [(B, T, K), (B, T, F)],
      ),
      (
        f"NetVLAD {name} d(assign) dS x^T (per video)",
        2 * N * F * K,
        lambda d, x: jnp.einsum("bkf,btf->btk", d, x),
        [(B, K, F), (B, T, F)],
      ),
      (
        f"NetVLAD {name} d(W) g^T x",
        2 * N * F * K,
        lambda g, x: _barrier(g.T @ x),
        [(N, K), (N, F)],
      ),
    ]
  P = k * o
  heads = (
    ("MFB U", K * rgb, P),
    ("MFB V", K * audio, P),
    ("MoE gates", o, C * (E + 1)),
    ("MoE experts", o, C * E),
  )
  for name, n, m in heads:
    flops = 2 * B * n * m
    out += [
      (f"{name} forward", flops, lambda x, w: x @ w, [(B, n), (n, m)]),
      (f"{name} d(input)", flops, lambda d, w: d @ w.T, [(B, m), (n, m)]),
      (f"{name} d(weight)", flops, lambda x, d: x.T @ d, [(B, n), (B, m)]),
    ]
  return out


def time_product(fn, shapes, repeats: int) -> float:
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  if min(args.batch, args.frames, args.repeats) < 1:
    parser.error("--batch, --frames and --repeats must be >= 1")
  print("| product | GFLOP | ms | GFLOP/s |\n|---|---:|---:|---:|")
  total_s = total_flops = 0.0
  for name, flops, fn, shapes in products(args.batch, args.frames):
    seconds = time_product(fn, shapes, args.repeats)
    total_s, total_flops = total_s + seconds, total_flops + flops
    print(
      f"| {name} | {flops / 1e9:.2f} | {1e3 * seconds:.1f} | {flops / seconds / 1e9:.0f} |",
      flush=True,
    )
  print(
    f"| **all {len(products(1, 1))} products** | {total_flops / 1e9:.1f} | "
    f"{1e3 * total_s:.1f} | {total_flops / total_s / 1e9:.0f} |"
  )
  print(
    f"matmuls alone: {args.batch / total_s:.0f} examples/sec at most "
    f"(batch {args.batch}, {jax.devices()[0].device_kind})"
  )


if __name__ == "__main__":
  main()
