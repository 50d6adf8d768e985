"""Each planted kind of label is recoverable from the right feature, and only from it."""

import os

import numpy as np
import pytest

from mfb_jax import synthetic

NUM_VIDEOS, NUM_FIT = 800, 500  # Probes fit on the first NUM_FIT videos, score the rest.
SEED = int(os.environ.get("PROBE_SEED", 7))


def dequantize(q):
  return q.astype(np.float32) * (4.0 / 255.0) - 2.0


def auc(score, positive) -> float:
  """Probability that a random positive outscores a random negative (ties count half)."""
  diff = score[positive][:, None] - score[~positive][None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def average_precision(score, positive) -> float:
  hits = positive[np.argsort(-score, kind="stable")]
  precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision_at[hits].mean())


def linear_probe(x_fit, y_fit, ridge=1000.0):
  """Ridge regression on standardized features (dual form: fewer videos than dimensions)."""
  mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
  x = (x_fit - mean) / std
  alpha = np.linalg.solve(x @ x.T + ridge * np.eye(len(x)), y_fit - y_fit.mean(0))
  weights = x.T @ alpha
  return lambda z: ((z - mean) / std) @ weights


@pytest.fixture(scope="module")
def probe_set():
  return build_probe_set(SEED)


def build_probe_set(seed: int) -> dict:
  """A small world (16 active classes) and per-video features the probes need."""
  world = synthetic.make_world(seed, 16)
  events = {k: world.rows(k) for k in ("visual_event", "audio_event")}
  rgb, audio, ev_max, ev_mean, labels = [], [], [], [], []
  for i in range(NUM_VIDEOS):
    video = synthetic.generate_video(world, synthetic.video_rng(seed, "probe", i))
    frames_rgb, frames_audio = dequantize(video.rgb), dequantize(video.audio)
    rgb.append(frames_rgb.mean(0))
    audio.append(frames_audio.mean(0))
    proj = np.concatenate(
      [
        frames_rgb @ world.rgb_protos[events["visual_event"]].T,
        frames_audio @ world.audio_protos[events["audio_event"]].T,
      ],
      axis=1,
    )
    ev_max.append(proj.max(0))
    ev_mean.append(proj.mean(0))
    labels.append(np.isin(world.class_ids, video.labels))
  return dict(
    world=world,
    rgb=np.stack(rgb),
    audio=np.stack(audio),
    event_rows=np.concatenate(list(events.values())),
    event_max=np.stack(ev_max),
    event_mean=np.stack(ev_mean),
    labels=np.stack(labels),
  )


def test_static_classes_show_in_their_own_stream_only(probe_set):
  world, y = probe_set["world"], probe_set["labels"]
  for kind, own, other, protos in (
    ("visual", "rgb", "audio", world.rgb_protos),
    ("audio", "audio", "rgb", world.audio_protos),
  ):
    rows = world.rows(kind)
    true = [auc(probe_set[own] @ protos[n], y[:, n]) for n in rows]
    # Another class's prototype of the same kind: near chance (co-occurring labels give it a bit).
    wrong = [auc(probe_set[own] @ protos[np.roll(rows, 1)[j]], y[:, n]) for j, n in enumerate(rows)]
    assert min(true) > 0.9 and np.mean(wrong) < 0.7
    # Learnable without knowing the prototype, from the right stream only.
    fit, held = slice(0, NUM_FIT), slice(NUM_FIT, None)
    for stream, low, high in ((own, 0.85, 1.0), (other, 0.0, 0.65)):
      score = linear_probe(probe_set[stream][fit], y[fit][:, rows])(probe_set[stream][held])
      mean_auc = np.mean([auc(score[:, j], y[held][:, n]) for j, n in enumerate(rows)])
      assert low < mean_auc <= high, (kind, stream, mean_auc)


def test_conjunction_classes_need_both_streams(probe_set):
  world, y = probe_set["world"], probe_set["labels"]
  rows = world.rows("conjunction")
  sign_only = []
  for n in rows:
    visual = probe_set["rgb"] @ world.rgb_protos[n]
    sound = probe_set["audio"] @ world.audio_protos[n]
    positive = y[:, n]
    product = visual * sound
    assert auc(product, positive) > 0.95 and average_precision(product, positive) > 0.9
    for factor in (visual, sound):
      sign_only.append(abs(auc(factor, positive) - 0.5))
      # Its magnitude tells only that the context is there: precision about 1/2 at best.
      assert average_precision(np.abs(factor), positive) < 0.75
  # A factor's sign alone is at chance: AUC - 0.5 is the excess of (+, +) over (-, -) among the
  # positives, a fair-coin fluctuation (std 0.5 / sqrt(positives), 0.04-0.08 here).
  assert max(sign_only) < 0.25 and np.mean(sign_only) < 0.15
  # No linear probe, even on the concatenated streams, learns them.
  both = np.concatenate([probe_set["rgb"], probe_set["audio"]], axis=1)
  fit, held = slice(0, NUM_FIT), slice(NUM_FIT, None)
  score = linear_probe(both[fit], y[fit][:, rows])(both[held])
  assert np.mean([auc(score[:, j], y[held][:, n]) for j, n in enumerate(rows)]) < 0.65


def test_event_classes_survive_max_pooling_not_averaging(probe_set):
  y = probe_set["labels"]
  for j, n in enumerate(probe_set["event_rows"]):
    peak = auc(probe_set["event_max"][:, j], y[:, n])
    average = auc(probe_set["event_mean"][:, j], y[:, n])
    assert peak > 0.95 and average < peak - 0.2, (n, peak, average)
