r"""Frame-level MFB (the paper's future work): `--config=configs/frame_mfb.py:AGG`.

Every frame's rgb and audio are fused with MFB (k=4, o=256 per frame, ReLU, L2), the fused frames
are aggregated with AGG in {avgpool, dbof, netvlad, nextvlad} (mask honoured), dropout 0.1 on the
aggregated vector, then the paper's MoE. Everything else is the paper's recipe (configs/paper.py):

  TRAIN='/data/yt8m/frame/train*.tfrecord,/data/yt8m/frame/validate[0-2]*.tfrecord'
  EVAL='/data/yt8m/frame/validate3[01]*.tfrecord'
  python launch.py --config=configs/frame_mfb.py:dbof --workdir=workdirs/frame_mfb_dbof \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

`AGG,mfb` is accepted too, the form the sweep tool passes (`python -m mfb_jax.sweep
--config=configs/frame_mfb.py --fusions=mfb ...`); its report then prints the paper's GAP of the
video-level AGG+MFB cell beside these frame-level models: a reference, not the same model.

Expected: no published GAP (the paper's future work). One aggregator over 256-wide fused frames
replaces the two per-modality aggregators: parameters 6.1M (avgpool), 40.3M (dbof), 40.7M
(netvlad), 41.0M (nextvlad), against 38.5M for the paper's dbof,mfb; training matmul cost per
video 1.45 / 2.57 / 1.66 / 2.16 GFLOP against dbof,mfb's 2.98 (U and V run on all 300 frames).
Needs frame-level data (data.format='frame'; data.format='video' is refused at start-up).
"""

import ml_collections

from configs import default, paper
from mfb_jax.errors import ConfigError

AGGREGATORS = ("avgpool", "dbof", "netvlad", "nextvlad")
ARGS = AGGREGATORS  # Every valid argument (tests/test_configs.py builds each).


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's recipe with frame-level MFB and the aggregator `arg` ('AGG' or 'AGG,mfb')."""
  parts = [p.strip().lower() for p in (arg or "").split(",")]
  aggregators = AGGREGATORS
  if parts[0] not in aggregators:
    aggregators = paper.registered(AGGREGATORS, "AGGREGATORS")  # And those users added.
  if parts[0] not in aggregators or parts[1:] not in ([], ["mfb"]):
    raise ConfigError(
      f"configs/frame_mfb.py needs AGG (or AGG,mfb) with AGG in {{{', '.join(aggregators)}}}; "
      f"{paper._given(arg)} (e.g. configs/frame_mfb.py:dbof)"
    )
  config = default.get_config()
  config.model.fusion_level = "frame"
  config.model.fusion = "mfb"
  config.model.aggregator = parts[0]
  return config
