"""Training data without labels is refused early (LabelCheck), before it trains every class
towards 0 and exits 0."""

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax import errors


class LabelCheck:
  """Refuses training data without labels: none among a process's first VIDEOS training videos
  (unlabelled test shards, or a misnamed labels feature, would otherwise train every class
  towards 0 and exit 0). Decided on that many videos, not on one batch, so that a small local
  batch of partly unlabelled data is not refused by chance; periodic checkpoints wait until a
  labelled video is seen (may_save). Warns once about batches with some unlabelled videos."""

  VIDEOS = 32

  def __init__(self, config):
    self.config, self.seen, self.labelled, self.warned = config, 0, 0, False
    self.cleared = False  # Every process has seen a labelled video (may_save).

  def __call__(self, labels_BxC: np.ndarray, step: int, last: bool = False) -> None:
    """`last`: the run's last step, where it decides on however many videos it has seen."""
    labelled_B = labels_BxC.any(axis=1)
    if self.seen < self.VIDEOS:
      self.seen += len(labelled_B)
      self.labelled += int(labelled_B.sum())
      if (self.seen >= self.VIDEOS or last) and not self.labelled:
        raise self._unlabelled(step)
    if not self.warned and not labelled_B.all():
      self.warned = True
      logging.warning(
        "%d of the %d videos of the training batch for step %d have no labels (unlabelled "
        "test shards in data.train_pattern?); they train as negatives of every class",
        int((~labelled_B).sum()),
        len(labelled_B),
        step,
      )

  def may_save(self, step: int) -> bool:
    """Whether a periodic checkpoint may be saved: not while some process has seen only
    unlabelled videos, too few yet to decide (a corrected relaunch would resume from parameters
    trained towards all-zero labels). Agreed among processes: a save is collective."""
    if not self.cleared:
      ok = self.labelled > 0
      if jax.process_count() > 1:
        ok = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
      self.cleared = ok
      if not ok:
        logging.info("No checkpoint at step %d: no training video so far has a label", step)
    return self.cleared

  def _unlabelled(self, step: int) -> errors.DataError:
    data = self.config.data
    return errors.DataError(
      f"none of the {'first ' if self.seen >= self.VIDEOS else ''}{self.seen} training videos "
      f"(to step {step}) has a label: "
      f"data.train_pattern={data.train_pattern!r} looks unlabelled (test shards? "
      f"data.labels_feature={data.labels_feature!r})"
    )
