r"""A tiny model for tests and smoke runs: small widths, few frames, a few steps.

  python -m mfb_jax.synthetic --output_dir=/tmp/tiny_data --num_train=64 --num_eval=32 \
    --num_classes=64 --min_frames=8 --max_frames=24
  python launch.py --config=configs/tiny.py --workdir=/tmp/tiny \
    --config.data.train_pattern='/tmp/tiny_data/train-*' \
    --config.data.eval_pattern='/tmp/tiny_data/eval-*'

ARG optionally picks the cell, as in configs/paper.py: configs/tiny.py:netvlad,mfb.
Expected: about a minute on 2 cores, mostly compilation; the GAP means nothing.
"""

import ml_collections

from configs import default
from mfb_jax.errors import ConfigError

ARGS = ("dbof,mfb", "avgpool,concat", "netvlad,fc_concat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny config; `arg` = 'AGG,FUSION' (default netvlad,mfb)."""
  config = default.get_config()
  parts = [p.strip().lower() for p in (arg or "netvlad,mfb").split(",")]
  if len(parts) != 2 or not all(parts):
    raise ConfigError(
      f"configs/tiny.py needs AGG,FUSION (e.g. configs/tiny.py:dbof,mfb); got {arg!r}"
    )
  aggregator, fusion = parts
  config.model.aggregator, config.model.fusion = aggregator, fusion
  config.data.num_classes = 64
  config.data.max_frames = 16
  config.data.shuffle_buffer = 64
  config.model.dbof.hidden_size = 32
  config.model.netvlad.num_clusters = 2
  config.model.mfb.update(factor=2, output_dim=16)
  config.model.fc_concat.hidden_size = 32
  config.train.batch_size = 8
  config.train.num_steps = 6
  config.train.eval_every = 6
  config.train.checkpoint_every = 3
  config.train.log_every = 2
  config.eval.batch_size = 8
  config.bench.warmup_steps = 1
  config.bench.steps = 2
  return config
