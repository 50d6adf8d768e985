"""Progress output: step rates without compiling steps or evaluations, and the metric buffer
that bounds how many steps run ahead."""

import time

import numpy as np
import pytest

from mfb_jax import evaluate, progress, trainer


def test_the_step_rate_leaves_compiling_steps_and_evaluations_out():
  rate = progress.StepRate(now=1000.0, step=0)
  rate.exclude(60.0)  # Step 1 compiled for a minute.
  rate.exclude(50.0)  # So did step 4, the first with parameter norms.
  assert rate(1112.0, 4) == pytest.approx(1.0)  # Steps 2 and 3 in the other 2 s.
  assert rate(1116.0, 6) == pytest.approx(0.5)
  alone = progress.StepRate(now=0.0, step=10)
  alone.exclude(30.0)
  assert alone(30.0, 11) == pytest.approx(1 / 30)  # Only the compiling step: its own rate.
  # An evaluation between steps: its time is left out, the steps stay in.
  evaluated = progress.StepRate(now=0.0, step=0)
  evaluated.exclude(100.0, steps=0)
  assert evaluated(110.0, 10) == pytest.approx(1.0)


def test_progress_rates_leave_the_evaluations_out(tiny_config, tmp_path, monkeypatch):
  # An evaluation in a window counted as training time: 0.43 steps/s against 1.5 otherwise.
  tiny_config.train.update(num_steps=6, eval_every=2, log_every=3, checkpoint_every=100)
  evaluate_split, rates = evaluate.evaluate_split, []

  def slow_evaluation(*args, **kwargs):
    time.sleep(4.0)
    return evaluate_split(*args, **kwargs)

  def progress_line(step, total, loss, steps_per_sec, batch):
    rates.append(steps_per_sec)
    return ""

  monkeypatch.setattr(evaluate, "evaluate_split", slow_evaluation)
  monkeypatch.setattr(progress, "progress_line", progress_line)
  trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert len(rates) == 2 and rates[1] > 1.0  # Steps 4-6, with a 4 s evaluation at step 4.


def test_metric_buffer_averages_each_metric_over_the_steps_that_report_it():
  buffer = progress.MetricBuffer()
  buffer.add(1, {"loss": np.float32(1.0)})
  buffer.add(2, {"loss": np.float32(3.0), "grad_norm": np.float32(5.0)})
  assert buffer.flush() == {"loss": 2.0, "grad_norm": 5.0}
  assert buffer.flush() == {}


class _Loss:
  """A step's loss that records when the trainer waits for it."""

  def __init__(self, step, waited):
    self.step, self.waited = step, waited

  def block_until_ready(self):
    self.waited.append(self.step)
    return self


def test_metric_buffer_keeps_at_most_steps_ahead_steps_queued(monkeypatch):
  # Unbounded, JAX queues up to 32 CPU steps with their batches (10 GB for NetVLAD+MFB).
  for ahead in (1, 3):
    monkeypatch.setattr(progress, "STEPS_AHEAD", ahead)
    buffer, waited = progress.MetricBuffer(), []
    for step in range(1, 8):
      buffer.add(step, {"loss": _Loss(step, waited)})
      # Adding step s waits for step s - ahead: only `ahead` steps may still be queued.
      assert waited == list(range(1, step - ahead + 1))
