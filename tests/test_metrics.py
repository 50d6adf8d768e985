"""Metrics against hand-worked values, brute-force tie orders and the YouTube-8M paper's GAP."""

import itertools
import math

import jax
import numpy as np
import pytest

from mfb_jax import metrics
from mfb_jax.errors import DataError

# A fake model's fixed predictions: 4 videos, 6 classes, k = 2. Class 5 has no positives.
PROBS = np.array(
  [
    [0.9, 0.8, 0.1, 0.0, 0.0, 0.0],  # A, labels {0, 2}: top-2 (0.9 c0 hit) (0.8 c1 miss).
    [0.2, 0.7, 0.6, 0.3, 0.1, 0.0],  # B, labels {1, 2, 3}: (0.7 c1 hit) (0.6 c2 hit).
    [0.8, 0.1, 0.05, 0.5, 0.4, 0.0],  # C, labels {0, 4}: (0.8 c0 hit) (0.5 c3 miss).
    [0.3, 0.2, 0.6, 0.1, 0.9, 0.0],  # D, no labels: (0.9 c4 miss) (0.6 c2 miss).
  ],
  np.float32,
)
LABEL_IDS = [[0, 2], [1, 2, 3], [0, 4], []]
K = 2


def multi_hot(label_ids, num_classes):
  labels = np.zeros((len(label_ids), num_classes), np.float32)
  for row, ids in enumerate(label_ids):
    labels[row, ids] = 1.0
  return labels


LABELS = multi_hot(LABEL_IDS, 6)

# GAP by hand. 7 positives in all (2 + 3 + 2 + 0). The pool, ranked, in runs of tied scores:
#   0.9: {hit A, miss D}  0.8: {miss A, hit C}  0.7: {hit B}  0.6: {hit B, miss D}  0.5: {miss C}
# A run of two with one hit, after N pairs holding H hits, is worth on average over its two orders
# (1/2) (H+1)/(N+1) + (1/2) (H+1)/(N+2):
#   0.9: (1/2)(1/1) + (1/2)(1/2) = 3/4         0.8: (1/2)(2/3) + (1/2)(2/4) = 7/12
#   0.7: 3/5                                   0.6: (1/2)(4/6) + (1/2)(4/7) = 13/21
# GAP = (3/4 + 7/12 + 3/5 + 13/21) / 7 = (1072/420) / 7 = 268/735.
HAND_GAP = 268 / 735
# mAP by hand, per class: pooled pairs / positives of the class in the split.
#   c0: (0.9 hit) (0.8 hit), 2 positives -> (1/1 + 2/2) / 2 = 1
#   c1: (0.8 miss) (0.7 hit), 1 positive -> (1/2) / 1 = 1/2
#   c2: (0.6 hit, 0.6 miss tied), 2 positives (A's c2 is not in A's top-2) -> (3/4) / 2 = 3/8
#   c3: (0.5 miss), 1 positive -> 0        c4: (0.9 miss), 1 positive -> 0      c5: no positives
# mAP = (1 + 1/2 + 3/8 + 0 + 0) / 5 = 3/8 (the starter code would divide by all 6 classes: 5/16).
HAND_MAP = 3 / 8
HAND_HIT_AT_1 = 3 / 4  # A, B, C hit; D (no labels) cannot.
# PERR: A top-2 {c0, c1} -> 1/2; B top-3 (n = 3 > k) {c1, c2, c3} -> 3/3; C top-2 {c0, c3} -> 1/2.
HAND_PERR = (1 / 2 + 1 + 1 / 2) / 3
HAND_PERR_HITS = [1, 3, 1, 0]

summarize = jax.jit(metrics.summarize_batch, static_argnums=2)


def accumulate(batches, num_classes=6, top_k=K):
  accumulator = metrics.MetricsAccumulator(num_classes, top_k)
  for probs, labels, valid in batches:
    accumulator.add(jax.device_get(summarize(probs, labels, top_k)), valid)
  return accumulator.result()


def test_hand_worked_example():
  result = metrics.evaluate(PROBS, LABELS, top_k=K)
  assert result["gap"] == pytest.approx(HAND_GAP, abs=1e-12)
  assert result["map"] == pytest.approx(HAND_MAP, abs=1e-12)
  assert result["hit_at_1"] == pytest.approx(HAND_HIT_AT_1, abs=1e-12)
  assert result["perr"] == pytest.approx(HAND_PERR, abs=1e-12)
  assert result["num_examples"] == 4
  summary = jax.device_get(summarize(PROBS, LABELS, K))
  np.testing.assert_array_equal(summary["perr_hits"], HAND_PERR_HITS)
  np.testing.assert_array_equal(summary["num_positives"], [2, 3, 2, 0])
  np.testing.assert_array_equal(summary["top_classes"], [[0, 1], [1, 2], [0, 3], [4, 2]])


def test_uneven_batches_padding_and_order_give_the_same_result():
  whole = accumulate([(PROBS, LABELS, np.ones(4))])
  rng = np.random.default_rng(0)
  # Padding rows carry garbage that must be ignored: confident hits and extra labels.
  pad_probs = rng.uniform(size=(2, 6)).astype(np.float32)
  pad_labels = np.ones((2, 6), np.float32)
  batches = [
    (PROBS[[3]], LABELS[[3]], np.ones(1)),
    (
      np.concatenate([PROBS[[2, 0, 1]], pad_probs]),
      np.concatenate([LABELS[[2, 0, 1]], pad_labels]),
      np.array([1, 1, 1, 0, 0], np.float32),
    ),
  ]
  split = accumulate(batches)
  assert split["num_examples"] == 4
  for key in ("gap", "map", "hit_at_1"):  # Tie handling makes these independent of row order.
    assert split[key] == whole[key], key
  assert split["perr"] == pytest.approx(whole["perr"], abs=1e-15)


def test_ties_within_a_video_rank_lower_class_first():
  probs = np.array([[0.5, 0.5, 0.5, 0.1]], np.float32)
  miss = metrics.evaluate(probs, multi_hot([[1]], 4), top_k=1)
  assert miss["hit_at_1"] == 0.0 and miss["perr"] == 0.0 and miss["gap"] == 0.0
  hit = metrics.evaluate(probs, multi_hot([[0]], 4), top_k=1)
  assert hit["hit_at_1"] == 1.0 and hit["perr"] == 1.0 and hit["gap"] == 1.0
  # The tie at 0.5 decides which classes make the top-2: {c0, c1}, not c2.
  outside = metrics.evaluate(probs, multi_hot([[2]], 4), top_k=2)
  assert outside["gap"] == 0.0 and outside["map"] == 0.0
  # In the pool c0 and c1 still tie: AP averages their two orders, (1/2)(1/1) + (1/2)(1/2).
  assert metrics.evaluate(probs, multi_hot([[1]], 4), top_k=2)["gap"] == pytest.approx(0.75)


def plain_ap(ranked_hits, num_positives):
  """AP of one fully ordered list: sum of precision@i at each hit, over all positives."""
  found, total = 0, 0.0
  for i, hit in enumerate(ranked_hits, start=1):
    if hit:
      found += 1
      total += found / i
  return total / num_positives if num_positives else 0.0


def mean_ap_over_tie_orders(pool, num_positives):
  """Average of plain AP over every order of the tied scores (brute force)."""
  runs = [
    list(g) for _, g in itertools.groupby(sorted(pool, key=lambda x: -x[0]), key=lambda x: x[0])
  ]
  orders = [sorted(set(itertools.permutations([hit for _, hit in run]))) for run in runs]
  aps = [
    plain_ap([h for run in choice for h in run], num_positives)
    for choice in itertools.product(*orders)
  ]
  return sum(aps) / len(aps)


def top_k_pairs(probs_C, label_ids, k):
  ranked = sorted(range(len(probs_C)), key=lambda c: (-probs_C[c], c))[:k]
  return [(int(c), float(probs_C[c]), c in label_ids) for c in ranked]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gap_and_map_equal_mean_over_all_orders_of_tied_scores(seed):
  rng = np.random.default_rng(seed)
  num_videos, num_classes, k = 4, 4, 2
  probs = rng.choice([0.2, 0.5, 0.8], size=(num_videos, num_classes)).astype(np.float32)
  label_ids = [
    sorted(rng.choice(num_classes, size=rng.integers(0, 3), replace=False).tolist())
    for _ in range(num_videos)
  ]
  pairs = [p for row, ids in zip(probs, label_ids, strict=True) for p in top_k_pairs(row, ids, k)]
  expected_gap = mean_ap_over_tie_orders([(s, h) for _, s, h in pairs], sum(map(len, label_ids)))
  class_aps = []
  for c in range(num_classes):
    positives = sum(c in ids for ids in label_ids)
    if positives:
      class_aps.append(
        mean_ap_over_tie_orders([(s, h) for cls, s, h in pairs if cls == c], positives)
      )
  result = metrics.evaluate(probs, multi_hot(label_ids, num_classes), top_k=k)
  assert result["gap"] == pytest.approx(expected_gap, abs=1e-12)
  assert result["map"] == pytest.approx(np.mean(class_aps), abs=1e-12)


def numpy_summary(probs, labels, k):
  """summarize_batch written as a plain loop over videos."""
  out = {key: [] for key in metrics.SUMMARY_KEYS}
  for probs_C, labels_C in zip(probs, labels, strict=True):
    ids = set(np.flatnonzero(labels_C > 0).tolist())
    ranked = sorted(range(len(probs_C)), key=lambda c: (-probs_C[c], c))
    n = len(ids)
    out["top_scores"].append([probs_C[c] for c in ranked[:k]])
    out["top_classes"].append(ranked[:k])
    out["top_hits"].append([c in ids for c in ranked[:k]])
    out["num_positives"].append(n)
    out["perr_hits"].append(sum(c in ids for c in ranked[:n]))
    out["hit_at_1"].append(ranked[0] in ids)
    bits = [int(c in ids) for c in range(len(probs_C))] + [0] * (-len(probs_C) % 8)
    out["labels_packed"].append(
      [int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)]
    )
  return {key: np.array(value) for key, value in out.items()}


@pytest.mark.parametrize("max_labels", [3, 12])  # 3: every n <= k; 12: the exact top-n branch.
def test_summarize_batch_under_jit_equals_numpy(max_labels):
  rng = np.random.default_rng(max_labels)
  num_videos, num_classes, k = 9, 13, 4
  # Few distinct scores so ties matter, including ties across the k-th and n-th place.
  probs = rng.choice([0.0, 0.1, 0.25, 0.5, 0.75], size=(num_videos, num_classes)).astype(np.float32)
  labels = np.zeros((num_videos, num_classes), np.float32)
  for row in range(1, num_videos):  # Row 0 stays without labels.
    labels[row, rng.choice(num_classes, size=rng.integers(1, max_labels + 1), replace=False)] = 1
  with jax.numpy_rank_promotion("raise"):
    got = jax.device_get(summarize(probs, labels, k))
  want = numpy_summary(probs, labels, k)
  assert set(got) == set(metrics.SUMMARY_KEYS)
  for key in metrics.SUMMARY_KEYS:
    np.testing.assert_array_equal(got[key], want[key].astype(got[key].dtype), err_msg=key)
  assert (want["num_positives"] > k).any() == (max_labels > k)


def test_gap_at_20_matches_the_youtube8m_paper_definition():
  # Paper (Abu-El-Haija et al. 2016, sec. 4.2): keep each video's top-20 predictions, sort all of
  # them by confidence, GAP = sum_i p(i) * delta_r(i), recall over all positives of the split.
  rng = np.random.default_rng(7)
  num_videos, num_classes = 60, 40
  probs = rng.uniform(size=(num_videos, num_classes)).astype(np.float32)
  labels = (rng.uniform(size=(num_videos, num_classes)) < 0.08).astype(np.float32)
  pool = []
  for probs_C, labels_C in zip(probs, labels, strict=True):
    for c in np.argsort(-probs_C)[:20]:
      pool.append((float(probs_C[c]), float(labels_C[c])))
  pool.sort(key=lambda x: -x[0])
  total_positives, gap, hits = float(labels.sum()), 0.0, 0
  for i, (_, hit) in enumerate(pool, start=1):
    hits += hit
    gap += (hits / i) * (hit / total_positives)
  result = metrics.evaluate(probs, labels, top_k=20, batch_size=16)
  assert result["gap"] == pytest.approx(gap, abs=1e-12)
  # Hit@1 and mAP on the same data, straightforwardly.
  assert result["hit_at_1"] == pytest.approx(labels[np.arange(num_videos), probs.argmax(1)].mean())
  class_aps = []
  for c in np.flatnonzero(labels.sum(0)):
    pairs = sorted(
      (
        (float(p[c]), float(y[c]))
        for p, y in zip(probs, labels, strict=True)
        if c in np.argsort(-p)[:20]
      ),
      key=lambda x: -x[0],
    )
    class_aps.append(plain_ap([h for _, h in pairs], float(labels[:, c].sum())))
  assert result["map"] == pytest.approx(np.mean(class_aps), abs=1e-12)


def test_empty_split_and_mismatched_summaries_raise():
  with pytest.raises(DataError, match="empty"):
    metrics.MetricsAccumulator(6, K).result()
  summary = jax.device_get(summarize(PROBS, LABELS, K))
  with pytest.raises(ValueError, match="rows"):
    metrics.MetricsAccumulator(6, K).add(summary, np.ones(3))
  with pytest.raises(ValueError, match="top-3"):
    metrics.MetricsAccumulator(6, 3).add(summary, np.ones(4))
  with pytest.raises(ValueError, match="17 classes"):
    metrics.MetricsAccumulator(17, K).add(summary, np.ones(4))


def test_a_split_without_any_label_is_refused():
  # Unlabelled (test) videos read with zero labels; evaluated, they gave GAP 0.0 as a result.
  accumulator = metrics.MetricsAccumulator(6, K)
  accumulator.add(jax.device_get(summarize(PROBS, np.zeros_like(LABELS), K)), np.ones(4))
  with pytest.raises(DataError, match="none of the 4 videos to evaluate has a label"):
    accumulator.result()


def test_all_padding_counts_nothing():
  accumulator = metrics.MetricsAccumulator(6, K)
  accumulator.add(jax.device_get(summarize(PROBS, LABELS, K)), np.zeros(4))
  with pytest.raises(DataError):
    accumulator.result()
  assert math.isclose(accumulate([(PROBS, LABELS, np.array([1, 0, 0, 0]))])["gap"], 0.5)  # A alone.
