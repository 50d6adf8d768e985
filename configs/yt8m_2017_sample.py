r"""The avgpool row of the paper on REAL YouTube-8M data: the 2017 video-level sample shards.

The sample (../shared/yt8m_sample/, see its SOURCE.md) holds 7 labelled `validatea*.tfrecord`
shards of the 2017 (v1) release: 2382 videos, video-level `mean_rgb`/`mean_audio`, 4716 classes,
ids under `video_id`. Video-level features are already the frame means, so the avgpool
aggregator is exact on them (one 'frame' per video). Shards 0-4 train (1721 videos), 5-6
evaluate (661 videos). ARG is the fusion (audio, video, concat, fc_concat, mfb) or AGG,FUSION
with AGG = avgpool, so the sweep tool can run it:

  python launch.py --config=configs/yt8m_2017_sample.py:mfb --workdir=workdirs/yt8m2017_mfb
  python -m mfb_jax.sweep --workdir=sweeps/yt8m2017 --config=configs/yt8m_2017_sample.py \
    --aggregations=avgpool

This is a tiny sample (1721 training videos, 0.03% of the 2017 training set), not the paper's
data: README.md has the measured table, which only compares the fusions with each other.
Set YT8M_SAMPLE_DIR (or override the patterns) if the sample lives elsewhere.
"""

import os

import ml_collections

from configs import default

FUSIONS = ("audio", "video", "concat", "fc_concat", "mfb")
ARGS = FUSIONS
SAMPLE_DIR = os.environ.get(
  "YT8M_SAMPLE_DIR",
  os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/yt8m_sample")
  ),
)


def get_config(arg: str = "mfb") -> ml_collections.ConfigDict:
  """avgpool + FUSION on the 2017 video-level sample; arg = 'FUSION' or 'avgpool,FUSION'."""
  aggregator, _, fusion = (arg or "mfb").rpartition(",")
  if aggregator not in ("", "avgpool") or fusion not in FUSIONS:
    raise ValueError(
      f"configs/yt8m_2017_sample.py needs FUSION in {{{', '.join(FUSIONS)}}} (the aggregator is "
      f"always avgpool on video-level data); got {arg!r}"
    )
  config = default.get_config()
  config.model.aggregator, config.model.fusion = "avgpool", fusion
  data = config.data
  data.train_pattern = os.path.join(SAMPLE_DIR, "validatea[0-4].tfrecord")
  data.eval_pattern = os.path.join(SAMPLE_DIR, "validatea[5-6].tfrecord")
  data.format = "video"
  data.num_classes = 4716
  data.id_feature = "video_id"
  data.shuffle_buffer = 2048
  config.predict.vocabulary = os.path.join(SAMPLE_DIR, "label_names.csv")
  config.train.num_steps = 1000  # ~75 epochs of the 1721 training videos.
  config.train.eval_every = 100
  config.train.checkpoint_every = 500
  config.train.log_every = 50
  return config
