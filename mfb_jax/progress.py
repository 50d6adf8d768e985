"""The training loop's progress: train metrics kept on device between progress lines (and the
bound on steps queued ahead), the steps-per-second rate, the progress line itself, and the check
that a state about to be saved has not diverged."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mfb_jax.errors import TrainingError

# Train steps dispatched beyond the one running. Without a bound the loop runs ahead of a CPU's
# steps by dozens (JAX's dispatch is asynchronous), each queued step keeping its batch alive
# (177 MB per paper-sized float32 batch): a NetVLAD+MFB run (batch 128, 300 frames, 2-core Zen 5)
# peaked at 10.0-10.4 GB of host memory, against 4.6-4.9 GB with this bound, at the same speed
# once running and twice its speed over the first 50 steps.
STEPS_AHEAD = 1
_REMEDY = "lower optim.learning_rate or set optim.grad_clip_norm"


class MetricBuffer:
  """Train metrics kept on device until the next log/checkpoint, then checked for NaN/Inf.

  Adding a step's metrics waits for the step STEPS_AHEAD before it to finish: the next batch is
  still read while a step runs, but batches never pile up behind the running step.
  """

  def __init__(self, hint: Callable[[int], str] = lambda step: ""):
    """hint(step): what the error for a non-finite loss at `step` adds (the trainer names the
    checkpoint of the state that gave it, where one was saved)."""
    self.pending: list[tuple[int, dict]] = []
    self._hint = hint

  def add(self, step: int, step_metrics: dict) -> None:
    self.pending.append((step, step_metrics))
    if len(self.pending) > STEPS_AHEAD:
      jax.block_until_ready(self.pending[-1 - STEPS_AHEAD][1]["loss"])

  def flush(self) -> dict[str, float]:
    """Means of the pending metrics; raises TrainingError at the first non-finite loss.

    A metric only some steps report (the parameter norms of logged steps) is averaged over those.
    """
    if not self.pending:
      return {}
    steps, values = zip(*self.pending, strict=True)
    values = jax.device_get(list(values))
    self.pending = []
    for step, v in zip(steps, values, strict=True):
      if not np.isfinite(v["loss"]):
        raise TrainingError(
          f"the training loss is {float(v['loss'])} at step {step}; stopping without saving this "
          f"state ({_REMEDY}){self._hint(step)}"
        )
    keys = dict.fromkeys(k for v in values for k in v)
    return {k: float(np.mean([v[k] for v in values if k in v])) for k in keys}


class StepRate:
  """Steps per second between progress lines, leaving out the steps that compile (the first
  step, and the first with parameter norms: each compiles its variant of the train step,
  minutes for a paper model), unless a window holds nothing else."""

  def __init__(self, now: float, step: int):
    self.last, self.skipped = (now, step), (0.0, 0)

  def exclude(self, seconds: float, steps: int = 1) -> None:
    """`steps` steps of the current window took `seconds` compiling and running (0 steps: an
    evaluation between steps took them)."""
    self.skipped = (self.skipped[0] + seconds, self.skipped[1] + steps)

  def __call__(self, now: float, step: int) -> float:
    (then, before), (seconds, skipped) = self.last, self.skipped
    self.last, self.skipped = (now, step), (0.0, 0)
    if step - before > skipped:
      return (step - before - skipped) / max(now - then - seconds, 1e-9)
    return (step - before) / max(now - then, 1e-9)


def progress_line(step: int, total: int, loss: float, steps_per_sec: float, batch: int) -> str:
  eta = (total - step) / max(steps_per_sec, 1e-9)
  hours, rest = divmod(int(eta), 3600)
  return (
    f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%) loss {loss:.4f} "
    f"{steps_per_sec:.2f} steps/s {steps_per_sec * batch:.0f} ex/s ETA {hours}h{rest // 60:02d}m"
  )


def check_state(state, mesh, step: int) -> None:
  """TrainingError unless the state after `step` may be saved (state_problem)."""
  problem = state_problem(state, mesh)
  if problem:
    raise TrainingError(
      f"the state after step {step} diverged ({problem}); stopping without saving it ({_REMEDY})"
    )


def state_problem(state, mesh) -> str | None:
  """Why `state` must not be saved, or None: NaN or Inf in any of its arrays, or parameters so
  large that the sum of their squares overflows float32 (a diverged run, whose next loss is NaN:
  saved, it would be the state every resume starts from, and fails from again)."""
  named = [
    (jax.tree_util.keystr(path, simple=True, separator="/"), x)
    for path, x in jax.tree_util.tree_leaves_with_path(state)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if not named:
    return None
  finite, squares, largest = jax.device_get(_health_check(mesh)([x for _, x in named]))
  for (name, _), ok, fits, top in zip(named, finite, squares, largest, strict=True):
    if not ok:
      return f"{name} holds NaN or Inf"
    if name.startswith("params/") and not fits:
      return f"the squares of {name} sum past float32's range (largest magnitude {float(top):.3g})"
  return None


@functools.cache
def _health_check(mesh) -> Callable:
  return jax.jit(_leaf_health, out_shardings=NamedSharding(mesh, P()))


def _leaf_health(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per array: all finite; its squared sum finite (float32); its largest magnitude."""
  wide = [x.astype(jnp.float32) for x in leaves]
  finite = jnp.stack([jnp.isfinite(x).all() for x in wide])
  squares = jnp.stack([jnp.isfinite(jnp.sum(jnp.square(x))) for x in wide])
  largest = jnp.stack([jnp.max(jnp.abs(x)) if x.size else jnp.float32(0) for x in wide])
  return finite, squares, largest
