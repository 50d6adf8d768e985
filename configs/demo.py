r"""The README's demo: NetVLAD + MFB + MoE on the synthetic shards, a few minutes on 2 CPU cores.

  make demo
  # which runs:
  python -m mfb_jax.synthetic --output_dir=/tmp/mfb_jax_demo/data --num_train=2000 --num_eval=500
  python launch.py --config=configs/demo.py --workdir=/tmp/mfb_jax_demo/work \
    --config.data.train_pattern='/tmp/mfb_jax_demo/data/train-*' \
    --config.data.eval_pattern='/tmp/mfb_jax_demo/data/eval-*'

The paper's NetVLAD+MFB model with its recipe (Adam 2e-4 is raised to 1e-3 for the short run),
on 150-frame clips of at most 150 frames and batch 64, for 600 steps. Expected: GAP@20 rising
from about 0.05 to above 0.6 on the held-out synthetic videos (BENCHMARKS.md has the timing).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The demo config."""
  config = default.get_config()
  config.model.aggregator = "netvlad"
  config.model.fusion = "mfb"
  config.data.max_frames = 150
  config.data.shuffle_buffer = 512
  config.optim.learning_rate = 1e-3
  config.train.batch_size = 64
  config.train.num_steps = 600
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.train.log_every = 50
  config.eval.batch_size = 100
  return config
