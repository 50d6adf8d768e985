r"""YouTube-8M evaluation metrics (GAP@k, mAP, Hit@1, PERR), exact over a split seen in batches.

The eval step runs `summarize_batch` on device: per video, its top-k (score, class, hit) and a few
counts, so the host never holds [B, C] predictions. `MetricsAccumulator` pools those summaries
over the whole split (any batch sizes, padding rows, processes) and computes, as the official
starter code (eval_util.py, average_precision_calculator.py) defines them:

- GAP@k: pool the top-k (score, hit) pairs of every video and rank the pool by score;
  GAP = sum_i precision@i * hit_i / P, P = all positive labels in the split (also those that
  are not in any top-k). Videos without labels add their top-k as misses.
- mAP: the same AP per class over that class's pooled pairs, over the class's positives in the
  split, averaged over the classes with at least one positive. (The starter code averages over
  all classes, counting 0 for classes without positives, so its mAP shrinks with the vocabulary.)
- Hit@1: fraction of videos whose top prediction is one of its labels (unlabeled videos: 0).
- PERR: for a video with n > 0 labels, the fraction of its top-n predictions that are labels,
  averaged over the videos with labels. (The starter code also divides by unlabeled videos.)

Ties. Within a video equal scores rank by class id, lower first (as lax.top_k, np.argmax).
Across the pool the starter code breaks ties with a seeded shuffle of the pool, so its GAP
depends on the order the videos came in. Here each run of tied pairs counts with its expected
AP over all orders of the run (exact, closed form; see `_average_precisions`): plain AP when
nothing ties, and the same for any batch order, batch size or number of processes.

A score of -inf marks an empty top-k slot (a CSV row with fewer than k pairs): not ranked, no hit.

Scoring somebody's Kaggle-format predictions (see mfb_jax/score_csv.py):
  python -m mfb_jax.metrics --predictions=predictions.csv --labels='/data/validate*.tfrecord'
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mfb_jax.errors import DataError, UnlabelledError

# Per-video keys of a summary; every one has the batch as its leading axis.
SUMMARY_KEYS = (
  "top_scores",  # [B, k] float32, descending; -inf = empty slot.
  "top_classes",  # [B, k] int32, class ids of top_scores.
  "top_hits",  # [B, k] bool, the class is one of the video's labels.
  "num_positives",  # [B] int32, labels of the video (n).
  "perr_hits",  # [B] int32, labels among the video's top-n predictions (any n, also n > k).
  "hit_at_1",  # [B] bool, the top prediction is a label.
  "labels_packed",  # [B, ceil(C/8)] uint8, np.packbits of the multi-hot labels (mAP denominators).
)


def summarize_batch(
  probs_BxC: jax.Array, labels_BxC: jax.Array, top_k: int
) -> dict[str, jax.Array]:
  """Per-video metric summary of one batch (jit-able; keys and shapes in SUMMARY_KEYS)."""
  num_classes = probs_BxC.shape[1]
  k = min(top_k, num_classes)
  probs_BxC = probs_BxC.astype(jnp.float32)
  positive_BxC = labels_BxC > 0
  num_positives_B = positive_BxC.sum(axis=1, dtype=jnp.int32)
  scores_BxK, classes_BxK = lax.top_k(probs_BxC, k)  # Ties: lower class id first.
  hits_BxK = jnp.take_along_axis(positive_BxC, classes_BxK, axis=1) & (scores_BxK > -jnp.inf)
  # Videos with more labels than k are rare; only then pay for the exact top-n selection.
  perr_hits_B = lax.cond(
    jnp.any(num_positives_B > k),
    _hits_in_top_n,
    lambda probs, positive, n: _hits_in_top_k_prefix(hits_BxK, n),
    probs_BxC,
    positive_BxC,
    num_positives_B,
  )
  return {
    "top_scores": scores_BxK,
    "top_classes": classes_BxK,
    "top_hits": hits_BxK,
    "num_positives": num_positives_B,
    "perr_hits": perr_hits_B,
    "hit_at_1": hits_BxK[:, 0],
    "labels_packed": jnp.packbits(positive_BxC, axis=1),
  }


def _hits_in_top_k_prefix(hits_BxK: jax.Array, n_B: jax.Array) -> jax.Array:
  """Hits among the first n of the top-k (valid when every n <= k)."""
  cum_hits_BxK = jnp.cumsum(hits_BxK, axis=1, dtype=jnp.int32)
  last_B = jnp.clip(n_B - 1, 0, hits_BxK.shape[1] - 1)
  prefix_B = jnp.take_along_axis(cum_hits_BxK, last_B[:, None], axis=1)[:, 0]
  return jnp.where(n_B > 0, prefix_B, 0)


def _hits_in_top_n(probs_BxC: jax.Array, positive_BxC: jax.Array, n_B: jax.Array) -> jax.Array:
  """Positives among each video's top-n classes, exact for any n, in O(32 B C) without a sort."""
  # Order-preserving uint32 image of float32 (negative floats reversed), so that a bitwise radix
  # select finds the n-th largest score: the largest key t with at least n keys >= t.
  bits_BxC = lax.bitcast_convert_type(probs_BxC, jnp.uint32)
  key_BxC = jnp.where(bits_BxC >> 31 == 1, ~bits_BxC, bits_BxC | jnp.uint32(1 << 31))
  n_u32_B = n_B.astype(jnp.uint32)

  def set_bit(i, t_B):
    cand_B = t_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    count_B = (key_BxC >= cand_B[:, None]).sum(axis=1, dtype=jnp.uint32)
    return jnp.where(count_B >= n_u32_B, cand_B, t_B)

  t_B = lax.fori_loop(0, 32, set_bit, jnp.zeros(n_B.shape, jnp.uint32))
  above_BxC = key_BxC > t_B[:, None]
  at_BxC = key_BxC == t_B[:, None]
  # Of the classes tied at the n-th score, take the lowest class ids, as lax.top_k does.
  room_B = n_B - above_BxC.sum(axis=1, dtype=jnp.int32)
  tied_rank_BxC = jnp.cumsum(at_BxC, axis=1, dtype=jnp.int32)
  chosen_BxC = above_BxC | (at_BxC & (tied_rank_BxC <= room_B[:, None]))
  hits_BxC = chosen_BxC & positive_BxC & (probs_BxC > -jnp.inf)
  return jnp.where(n_B > 0, hits_BxC.sum(axis=1, dtype=jnp.int32), 0)


def _average_precisions(
  scores_N: np.ndarray, hits_N: np.ndarray, groups_N: np.ndarray, positives_G: np.ndarray
) -> np.ndarray:
  """AP of each group's pairs ranked by score, ties counted at their expectation.

  A run of m tied pairs holding p hits, after N pairs and H hits ranked above it: the slot at
  rank N + t holds a hit with probability p/m and then, on average over the orders of the run,
  (t-1)(p-1)/(m-1) other hits of the run sit above it, so its expected precision * hit is
  p/m * (H + 1 + (t-1)(p-1)/(m-1)) / (N + t). It depends on the slot only, so the sum does not
  depend on which tied pair the sort put first.

  Args:
    scores_N: scores of the pooled pairs.
    hits_N: whether each pair is a positive.
    groups_N: group (class, or 0 for GAP) of each pair, in [0, G).
    positives_G: positives of each group in the split (the AP denominator).

  Returns:
    float64 [G], 0 where a group has no positives.
  """
  order = np.lexsort((-scores_N.astype(np.float64), groups_N))
  scores, groups = scores_N[order], groups_N[order]
  hits = hits_N[order].astype(np.float64)
  slot = np.arange(len(order))
  new_group = np.ones(len(order), bool)
  new_group[1:] = groups[1:] != groups[:-1]
  new_run = new_group.copy()
  new_run[1:] |= scores[1:] != scores[:-1]
  group_start = np.maximum.accumulate(np.where(new_group, slot, 0))
  run_start = np.maximum.accumulate(np.where(new_run, slot, 0))
  run_id = np.cumsum(new_run) - 1
  m = np.bincount(run_id)[run_id].astype(np.float64)
  p = np.bincount(run_id, weights=hits)[run_id]
  hits_before = np.cumsum(hits) - hits  # Hits ranked above each slot, any group.
  hits_above_run = hits_before[run_start] - hits_before[group_start]
  ranked_above_run = (run_start - group_start).astype(np.float64)
  t = (slot - run_start + 1).astype(np.float64)
  others = np.where(m > 1, (p - 1) / np.maximum(m - 1, 1), 0.0)
  expected = p / m * (hits_above_run + 1 + (t - 1) * others) / (ranked_above_run + t)
  sums_G = np.bincount(groups, weights=expected, minlength=len(positives_G))
  return np.where(positives_G > 0, sums_G / np.maximum(positives_G, 1), 0.0)


class MetricsAccumulator:
  """Pools per-video summaries of a whole split; `result()` gives its exact metrics."""

  def __init__(self, num_classes: int, top_k: int):
    self.num_classes = num_classes
    self.top_k = min(top_k, num_classes)
    self._rows = {key: [] for key in SUMMARY_KEYS if key != "labels_packed"}
    self._class_positives_C = np.zeros(num_classes, np.int64)

  def add(self, summary: dict[str, np.ndarray], valid_B: np.ndarray) -> None:
    """Adds one batch's summary; rows with valid_B == 0 (padding) are ignored."""
    keep_B = np.asarray(valid_B).reshape(-1) > 0
    for key in SUMMARY_KEYS:
      if np.shape(summary[key])[0] != keep_B.shape[0]:
        raise ValueError(
          f"summary[{key!r}] has {np.shape(summary[key])[0]} rows, valid has {keep_B.shape[0]}"
        )
    if np.shape(summary["top_scores"])[1] != self.top_k:
      raise ValueError(
        f"summary has top-{np.shape(summary['top_scores'])[1]}, expected top-{self.top_k}"
      )
    if np.shape(summary["labels_packed"])[1] != (self.num_classes + 7) // 8:
      raise ValueError(f"summary's packed labels do not hold {self.num_classes} classes")
    for key, chunks in self._rows.items():
      chunks.append(np.asarray(summary[key])[keep_B])
    packed_BxP = np.asarray(summary["labels_packed"])[keep_B]
    labels_BxC = np.unpackbits(packed_BxP, axis=1, count=self.num_classes)
    self._class_positives_C += labels_BxC.sum(axis=0, dtype=np.int64)

  def result(self) -> dict:
    """gap, map, hit_at_1, perr (python floats) and num_examples over everything added."""
    rows = {key: np.concatenate(chunks) if chunks else None for key, chunks in self._rows.items()}
    if rows["num_positives"] is None or len(rows["num_positives"]) == 0:
      raise DataError("no videos to evaluate: the evaluation split is empty")
    if not self._class_positives_C.any():  # GAP would read 0 whatever the predictions.
      raise UnlabelledError(
        f"none of the {len(rows['num_positives'])} videos to evaluate has a label (unlabelled "
        "test data?); GAP, mAP and PERR need labelled videos (--mode=predict does not)"
      )
    scores_N = rows["top_scores"].reshape(-1)
    ranked_N = scores_N > -np.inf
    scores_N = scores_N[ranked_N]
    hits_N = rows["top_hits"].reshape(-1)[ranked_N].astype(bool)
    classes_N = rows["top_classes"].reshape(-1)[ranked_N].astype(np.int64)
    total_positives = np.array([self._class_positives_C.sum()])
    gap = _average_precisions(scores_N, hits_N, np.zeros_like(classes_N), total_positives)[0]
    aps_C = _average_precisions(scores_N, hits_N, classes_N, self._class_positives_C)
    has_positives_C = self._class_positives_C > 0
    num_positives_B = rows["num_positives"].astype(np.float64)
    labeled_B = num_positives_B > 0
    perr_B = rows["perr_hits"][labeled_B] / num_positives_B[labeled_B]
    return {
      "gap": float(gap),
      "map": float(aps_C[has_positives_C].mean()) if has_positives_C.any() else 0.0,
      "hit_at_1": float(rows["hit_at_1"].astype(np.float64).mean()),
      "perr": float(perr_B.mean()) if labeled_B.any() else 0.0,
      "num_examples": int(len(num_positives_B)),
    }


def evaluate(
  probs_NxC: np.ndarray, labels_NxC: np.ndarray, top_k: int, batch_size: int = 1024
) -> dict:
  """Metrics of whole prediction and label matrices, through the same summary and accumulator."""
  summarize = jax.jit(summarize_batch, static_argnums=2)
  accumulator = MetricsAccumulator(probs_NxC.shape[1], top_k)
  for start in range(0, len(probs_NxC), batch_size):
    probs_BxC = probs_NxC[start : start + batch_size]
    labels_BxC = labels_NxC[start : start + batch_size]
    summary = jax.device_get(summarize(probs_BxC, labels_BxC, top_k))
    accumulator.add(summary, np.ones(len(probs_BxC)))
  return accumulator.result()


if __name__ == "__main__":
  import sys

  from mfb_jax import score_csv

  sys.exit(score_csv.main())
