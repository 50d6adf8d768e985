r"""Any cell of the paper's Tables 1-3: `--config=configs/paper.py:AGG,FUSION`.

AGG (temporal aggregation, applied to rgb and audio separately) is one of avgpool, netvlad, dbof;
FUSION is one of audio, video, concat, fc_concat, mfb. Beyond the paper, AGG may also be nextvlad
and FUSION mfh (see the end of this docstring). Everything else comes from configs/default.py:
the paper's recipe (MoE with 2 experts, L2 1e-6, Adam 2e-4, batch 128, 250k steps, eval every
10k steps, 300 frames; MFB dropout 0.1; DBoF 2000 units; NetVLAD K=8) and our choices where the
paper is silent (MFB k=4, o=1024; a constant, unclipped learning rate; the classifier's bias
starting at 3 expected labels; README.md "Implementation choices the paper leaves open").

Data: the official YouTube-8M 2018 frame-level shards (trainNNNN / validateNNNN.tfrecord). The
paper trains on all 3844 train shards plus 3000 validate shards and evaluates on 200 of the other
844 validate shards; these two globs give exactly those counts (a fixed choice of the 200):

  TRAIN='/data/yt8m/frame/train*.tfrecord,/data/yt8m/frame/validate[0-2]*.tfrecord'
  EVAL='/data/yt8m/frame/validate3[01]*.tfrecord'

Commands, and the GAP@20 (%) the paper reports after 250k steps (Liu et al. 2018, Tables 1-3;
NetVLAD+MFB's run was early stopped at about 13,000 steps for overfitting, Sec. 4.3;
eval_results.json reports GAP as a fraction, i.e. 0.859 for 85.9):

  # avgpool,audio: paper GAP 38.1 (Table 1)
  python launch.py --config=configs/paper.py:avgpool,audio \
    --workdir=workdirs/avgpool_audio \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # avgpool,video: paper GAP 69.6 (Table 1)
  python launch.py --config=configs/paper.py:avgpool,video \
    --workdir=workdirs/avgpool_video \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # avgpool,concat: paper GAP 74.2 (Table 1)
  python launch.py --config=configs/paper.py:avgpool,concat \
    --workdir=workdirs/avgpool_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # avgpool,fc_concat: paper GAP 81.8 (Table 1)
  python launch.py --config=configs/paper.py:avgpool,fc_concat \
    --workdir=workdirs/avgpool_fc_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # avgpool,mfb: paper GAP 83.3 (Table 1)
  python launch.py --config=configs/paper.py:avgpool,mfb \
    --workdir=workdirs/avgpool_mfb \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # netvlad,audio: paper GAP 50.7 (Table 2)
  python launch.py --config=configs/paper.py:netvlad,audio \
    --workdir=workdirs/netvlad_audio \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # netvlad,video: paper GAP 82.3 (Table 2)
  python launch.py --config=configs/paper.py:netvlad,video \
    --workdir=workdirs/netvlad_video \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # netvlad,concat: paper GAP 85.0 (Table 2)
  python launch.py --config=configs/paper.py:netvlad,concat \
    --workdir=workdirs/netvlad_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # netvlad,fc_concat: paper GAP 84.6 (Table 2)
  python launch.py --config=configs/paper.py:netvlad,fc_concat \
    --workdir=workdirs/netvlad_fc_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # netvlad,mfb: paper GAP 85.5 (Table 2; early stopped at about 13k steps)
  python launch.py --config=configs/paper.py:netvlad,mfb \
    --workdir=workdirs/netvlad_mfb \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # dbof,audio: paper GAP 48.9 (Table 3)
  python launch.py --config=configs/paper.py:dbof,audio \
    --workdir=workdirs/dbof_audio \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # dbof,video: paper GAP 81.8 (Table 3)
  python launch.py --config=configs/paper.py:dbof,video \
    --workdir=workdirs/dbof_video \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # dbof,concat: paper GAP 84.0 (Table 3)
  python launch.py --config=configs/paper.py:dbof,concat \
    --workdir=workdirs/dbof_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # dbof,fc_concat: paper GAP 84.1 (Table 3)
  python launch.py --config=configs/paper.py:dbof,fc_concat \
    --workdir=workdirs/dbof_fc_concat \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # dbof,mfb: paper GAP 85.9 (Table 3)
  python launch.py --config=configs/paper.py:dbof,mfb \
    --workdir=workdirs/dbof_mfb \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

Beyond the paper (no published GAP for these cells; same recipe, same data):

  # NeXtVLAD (Lin et al. 2018; K=32, lambda=2, G=8: NetVLAD K=8's output widths) + MFB
  python launch.py --config=configs/paper.py:nextvlad,mfb \
    --workdir=workdirs/nextvlad_mfb \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

  # DBoF + MFH (Yu et al. 2018: two cascaded MFB blocks, k=4, o=1024, fused size 2048)
  python launch.py --config=configs/paper.py:dbof,mfh \
    --workdir=workdirs/dbof_mfh \
    --config.data.train_pattern="$TRAIN" --config.data.eval_pattern="$EVAL"

Any AGG in {avgpool, netvlad, dbof, nextvlad} combines with any FUSION in {audio, video, concat,
fc_concat, mfb, mfh}; BEYOND_ARGS lists the new cells. Expected: no published GAP exists for
them and they have not been trained on the full data here; `python -m mfb_jax.model --count
--beyond` prints their sizes (nextvlad,mfb 60.3M and dbof,mfh 74.7M parameters).
"""

import ml_collections

from configs import default
from mfb_jax.errors import ConfigError

AGGREGATORS = ("avgpool", "netvlad", "dbof")  # The paper's, in its table order.
FUSIONS = ("audio", "video", "concat", "fc_concat", "mfb")
# Accepted too, but not in the paper's tables (PAPER_GAP has no entry for them).
BEYOND_AGGREGATORS = ("nextvlad",)
BEYOND_FUSIONS = ("mfh",)

# GAP@20 in percent as printed in the paper, keyed by the config argument "AGG,FUSION".
PAPER_GAP = {
  # Table 1.
  "avgpool,audio": 38.1,
  "avgpool,video": 69.6,
  "avgpool,concat": 74.2,
  "avgpool,fc_concat": 81.8,
  "avgpool,mfb": 83.3,
  # Table 2.
  "netvlad,audio": 50.7,
  "netvlad,video": 82.3,
  "netvlad,concat": 85.0,
  "netvlad,fc_concat": 84.6,
  "netvlad,mfb": 85.5,
  # Table 3.
  "dbof,audio": 48.9,
  "dbof,video": 81.8,
  "dbof,concat": 84.0,
  "dbof,fc_concat": 84.1,
  "dbof,mfb": 85.9,
}

# The paper's 15 cells, in its table order (tests and sweeps iterate it).
ARGS = tuple(PAPER_GAP)
# Every cell that involves a module beyond the paper.
BEYOND_ARGS = tuple(
  f"{agg},{fusion}"
  for agg in AGGREGATORS + BEYOND_AGGREGATORS
  for fusion in FUSIONS + BEYOND_FUSIONS
  if agg in BEYOND_AGGREGATORS or fusion in BEYOND_FUSIONS
)


def registered(known: tuple[str, ...], registry: str) -> tuple[str, ...]:
  """`known`, then the other names in mfb_jax.model's `registry` (modules users added there;
  imported only when a name is not among `known`: the import costs seconds)."""
  from mfb_jax import model

  return known + tuple(sorted(set(getattr(model, registry)) - set(known)))


def _parse(arg: str | None) -> tuple[str, str]:
  """Splits "AGG,FUSION" and checks both names (the paper's, ours, or any registered one)."""
  aggregators, fusions = AGGREGATORS + BEYOND_AGGREGATORS, FUSIONS + BEYOND_FUSIONS
  parts = [p.strip().lower() for p in (arg or "").split(",")]
  if len(parts) == 2 and (parts[0] not in aggregators or parts[1] not in fusions):
    aggregators = registered(aggregators, "AGGREGATORS")
    fusions = registered(fusions, "FUSIONS")
  if len(parts) != 2 or parts[0] not in aggregators or parts[1] not in fusions:
    raise ConfigError(
      f"configs/paper.py needs AGG,FUSION with AGG in {{{', '.join(aggregators)}}} and "
      f"FUSION in {{{', '.join(fusions)}}}; {_given(arg)} (e.g. configs/paper.py:netvlad,mfb)"
    )
  return parts[0], parts[1]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default recipe with the aggregator and fusion of one paper cell."""
  aggregator, fusion = _parse(arg)
  config = default.get_config()
  config.model.aggregator = aggregator
  config.model.fusion = fusion
  return config


def _given(arg: str | None) -> str:
  """How a config's error names the argument it was given (`--config=FILE` alone: none)."""
  return "none was given" if arg is None else f"got {arg!r}"
