r"""The generative model behind the synthetic YouTube-8M shards (pure numpy, no model code).

A *world* (make_world) fixes which label ids occur, what kind of evidence decides each one and
the prototype directions of that evidence; generate_video draws one video from it. The video is
uint8 frame features exactly as in the 2018 frame-level data: rgb T x 1024, audio T x 128,
dequantized as q * 4/255 - 2 in [-2, 2].

Letters: T frames, D = 1024 rgb dims, A = 128 audio dims, N active (planted) classes.

Features. Frame t of a video is x_t = clip(mu + s * n_t, -2, 2), quantized to 8 bits, where
  * mu = b + (class evidence): b ~ N(0, bg^2 I) is a per-video static background;
  * n_t is unit-variance noise, correlated in time like real frames: n_t = a e_t + b' sum_{k=1..15}
    rho^k e_{t-k} (e white, truncated ARMA(1,1)) with corr(n_t, n_{t+k}) = w rho^k, w = 0.55,
    rho = 0.75 (lags 1, 2, 5: 0.41, 0.31, 0.13; the real sample video gives 0.40, 0.27, 0.15).
    e is drawn as a 256-level quantile table of N(0, 1) (4x faster than standard_normal).
  * bg = (0.43, 0.46), s = (0.85, 0.75) for (rgb, audio): per-dimension std of a frame is about
    1.0 (real frames are PCA-whitened: 0.96 / 0.92 in the sample) and of a video's mean about 0.47
    / 0.68, class evidence included (the real video-level features: 0.47 / 0.68).

Classes. max(16, active_fraction * num_classes) label ids (a random subset; 5% of 3862 = 193 by
default) are active, the rest never occur, like the rare classes of the real vocabulary. Each
active class has a prevalence pi_c following a Zipf-like profile (rank^-0.7, ranks random; the
most common class is in about 20% of videos) and one kind (shares of the active classes):
  * visual (35%): a unit prototype v_c in rgb space; a labelled video adds
    strength * 4.0 * v_c to mu_rgb (strength ~ U[0.5, 1.5]), present in every frame.
  * audio (20%): the same in audio space, amplitude 5.0 (the audio background is wider).
  * conjunction (20%): a visual factor u_c and an audio factor w_c (unit vectors). With probability
    2 * m * pi_c (m: see labels) the video has the class's *context*: it adds sv * 4.0 * u_c to
    mu_rgb and sa * 5.0 * w_c to mu_audio (times strength ~ U[0.75, 1.25] each), with two fair,
    independent signs sv, sa in {+1, -1}. The label fires iff the context is present and
    sv == sa. Either sign alone is independent of the label (P = 1/2 either way), so no function
    of one stream beats "context present" (precision at most 1/2); the product
    (u_c . rgb_mean) * (w_c . audio_mean) > 0 decides it: a rank-1 bilinear form, what MFB
    computes. A linear classifier on the concatenation can isolate only one of the two agreeing
    corners, (+, +) or (-, -): at most half the positives (its AUC stays at chance); a
    mixture-of-experts head can do more by gating on one sign and predicting from the other.
  The amplitudes are per-dimension small (4 / sqrt(1024) = 0.13 in rgb) but large enough that a
  linear probe on video means learns the frequent visual classes from ~1000 videos (the default
  set): the estimate of a 1024-d direction from n positives has noise norm ~0.47 sqrt(1024 / n).
  * visual_event / audio_event (12.5% each): a unit prototype e_c in one modality; a labelled
    video adds strength * 6.0 * e_c to L ~ U{3..8} consecutive frames at a random position
    (strength ~ U[0.7, 1.3]). Frame noise projected on e_c has std 0.85 / 0.75, so the event
    stands out per frame (max-pooling, DBoF, NetVLAD clusters), but averaged over 60-300 frames it
    is 6 * L / T ~ 0.1-0.8, under the spread of a video mean's projection (0.47 / 0.68).

Labels. A per-video richness m ~ Gamma(3, 1/3) (mean 1; it makes label counts over-dispersed as
in real data). Each non-conjunction class fires independently with probability min(1, m pi_c);
conjunction classes fire as above (probability m pi_c). A video with no label gets one
non-conjunction class drawn in proportion to pi. pi is scaled so the mean label count is
labels_per_video (3.0 by default; 3 in the 2018 data, 3.4 in the v1 sample).

Every video is a pure function of (world, rng, frame range); see video_rng for the per-video
seeding that makes the written shards deterministic and independent of the shard count.
"""

import dataclasses
import statistics
import zlib
from typing import NamedTuple

import numpy as np

from mfb_jax import errors

RGB_SIZE = 1024
AUDIO_SIZE = 128
KINDS = ("visual", "audio", "conjunction", "visual_event", "audio_event")
MIN_NUM_CLASSES = len(KINDS)
_NOISE_TAPS = 15  # The ARMA tail is cut after rho^15 = 0.013 (0.02% of its variance).


@dataclasses.dataclass(frozen=True)
class Params:
  """Generative parameters; pairs are (rgb, audio). Defaults are documented in the module."""

  labels_per_video: float = 3.0
  active_fraction: float = 0.05
  min_active: int = 16
  kind_shares: tuple[float, ...] = (0.35, 0.2, 0.2, 0.125, 0.125)  # In the order of KINDS.
  zipf_exponent: float = 0.7
  richness_shape: float = 3.0
  background_std: tuple[float, float] = (0.43, 0.46)
  noise_std: tuple[float, float] = (0.85, 0.75)
  noise_rho: float = 0.75
  noise_weight: float = 0.55
  class_amplitude: tuple[float, float] = (4.0, 5.0)
  class_strength: tuple[float, float] = (0.5, 1.5)
  factor_amplitude: tuple[float, float] = (4.0, 5.0)
  factor_strength: tuple[float, float] = (0.75, 1.25)
  event_amplitude: float = 6.0
  event_strength: tuple[float, float] = (0.7, 1.3)
  event_frames: tuple[int, int] = (3, 8)


@dataclasses.dataclass(frozen=True)
class World:
  """Active classes (rows n = 0..N-1), their kinds, prevalences and prototypes."""

  num_classes: int
  params: Params
  class_ids: np.ndarray  # [N] int64 label id of each active class.
  kinds: np.ndarray  # [N] int64 index into KINDS.
  prevalence: np.ndarray  # [N] float64 pi_c.
  rgb_protos: np.ndarray  # [N, D] float32 unit rows (zero where the kind has no visual part).
  audio_protos: np.ndarray  # [N, A] float32 unit rows (zero where the kind has no audio part).

  def rows(self, kind: str) -> np.ndarray:
    """Row indices of the active classes of one kind."""
    return np.flatnonzero(self.kinds == KINDS.index(kind))

  def ids(self, kind: str) -> list[int]:
    """Sorted label ids of one kind."""
    return sorted(int(i) for i in self.class_ids[self.rows(kind)])


class Video(NamedTuple):
  """One generated video: uint8 quantized frames and its sorted label ids."""

  rgb: np.ndarray  # [T, D] uint8.
  audio: np.ndarray  # [T, A] uint8.
  labels: np.ndarray  # int64, sorted, at least one.


def make_world(seed: int, num_classes: int = 3862, params: Params | None = None) -> World:
  """Draws the active classes, their kinds, prevalences and prototypes from `seed`."""
  params = params or Params()
  if num_classes < MIN_NUM_CLASSES:
    raise errors.ConfigError(
      f"num_classes={num_classes}: need at least {MIN_NUM_CLASSES} (one class of each kind)"
    )
  if not 0.0 < params.active_fraction <= 1.0:
    raise errors.ConfigError(f"active_fraction={params.active_fraction}: must be in (0, 1]")
  N = min(num_classes, max(params.min_active, round(params.active_fraction * num_classes)))
  if not 1.0 <= params.labels_per_video <= N:  # NaN too: a traceback from numpy.
    raise errors.ConfigError(
      f"labels_per_video={params.labels_per_video}: must be in [1, {N}], {N} being the "
      "number of classes that occur (active_fraction * num_classes, at least 16 or all)"
    )
  rng = np.random.default_rng([0x3F1D, seed])
  class_N = np.sort(rng.choice(num_classes, size=N, replace=False)).astype(np.int64)
  kind_N = rng.permutation(_kind_counts(N, params.kind_shares))
  weight_N = (1.0 + rng.permutation(N)) ** -params.zipf_exponent
  extra = _extra_labels(params.labels_per_video, params.richness_shape)
  rgb_proto_NxD = _unit_rows(rng, N, RGB_SIZE)
  audio_proto_NxA = _unit_rows(rng, N, AUDIO_SIZE)
  kinds = np.asarray(KINDS)[kind_N]
  rgb_proto_NxD[~np.isin(kinds, ("visual", "conjunction", "visual_event"))] = 0.0
  audio_proto_NxA[~np.isin(kinds, ("audio", "conjunction", "audio_event"))] = 0.0
  return World(
    num_classes=num_classes,
    params=params,
    class_ids=class_N,
    kinds=kind_N,
    prevalence=extra * weight_N / weight_N.sum(),
    rgb_protos=rgb_proto_NxD,
    audio_protos=audio_proto_NxA,
  )


def _kind_counts(N: int, shares: tuple[float, ...]) -> np.ndarray:
  """Kind index per class: at least one of each kind, the rest by largest remainder."""
  share_K = np.asarray(shares, np.float64) / sum(shares)
  count_K = np.ones(len(KINDS), np.int64)
  ideal_K = share_K * N - count_K
  count_K += np.maximum(np.floor(ideal_K), 0).astype(np.int64)
  order = np.argsort(-(ideal_K - np.floor(ideal_K)), kind="stable")
  count_K[order[: N - count_K.sum()]] += 1
  return np.repeat(np.arange(len(KINDS)), count_K)


def _extra_labels(target: float, shape: float) -> float:
  """Sum of pi so that E[count] = target, counting the at-least-one rule (Poisson approx)."""
  # E[count] ~ lam + P(no label) and P(no label) = E_m[exp(-m lam)] = (1 + lam / shape)^-shape.
  low, high = 0.0, target
  for _ in range(60):
    lam = (low + high) / 2
    low, high = (lam, high) if lam + (1 + lam / shape) ** -shape < target else (low, lam)
  return (low + high) / 2


def _unit_rows(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
  x = rng.standard_normal((rows, dims))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The random stream of video `index` of `split`: independent of shard layout and order."""
  return np.random.default_rng([0x71DE0, seed, zlib.crc32(split.encode()), index])


def generate_video(
  world: World, rng: np.random.Generator, min_frames: int = 60, max_frames: int = 300
) -> Video:
  """Draws one video (frame count uniform in [min_frames, max_frames]) and its labels."""
  p = world.params
  T = int(rng.integers(min_frames, max_frames + 1))
  label_mask_N, coef_rgb_N, coef_audio_N = _labels_and_evidence(world, rng)
  background = rng.standard_normal(RGB_SIZE + AUDIO_SIZE) * np.repeat(
    p.background_std, (RGB_SIZE, AUDIO_SIZE)
  )
  mu = background + np.concatenate(
    [coef_rgb_N @ world.rgb_protos, coef_audio_N @ world.audio_protos]
  )
  noise_std = np.repeat(np.asarray(p.noise_std, np.float32), (RGB_SIZE, AUDIO_SIZE))
  x_TxF = _frame_noise(rng, T, RGB_SIZE + AUDIO_SIZE, p.noise_rho, p.noise_weight)
  x_TxF *= noise_std
  x_TxF += mu.astype(np.float32)
  _add_events(world, rng, label_mask_N, x_TxF)
  # floor(y + 0.5) of y = (x + 2) * 255/4: round to the nearest of the 256 levels, then clip.
  q_TxF = np.clip(x_TxF * np.float32(255 / 4) + np.float32(128.0), 0.0, 255.5).astype(np.uint8)
  return Video(q_TxF[:, :RGB_SIZE], q_TxF[:, RGB_SIZE:], world.class_ids[label_mask_N])


def _labels_and_evidence(world: World, rng: np.random.Generator):
  """Label mask [N] and the static coefficients of the rgb / audio prototypes [N] each."""
  p = world.params
  N = len(world.class_ids)
  conj_N = world.kinds == KINDS.index("conjunction")
  richness = rng.gamma(p.richness_shape, 1.0 / p.richness_shape)
  prob_N = np.minimum(1.0, richness * world.prevalence * np.where(conj_N, 2.0, 1.0))
  present_N = rng.random(N) < prob_N
  sign_v_N, sign_a_N = rng.choice((-1.0, 1.0), size=(2, N))
  label_N = present_N & (~conj_N | (sign_v_N == sign_a_N))
  if not label_N.any():
    base = world.prevalence * ~conj_N
    label_N[rng.choice(N, p=base / base.sum())] = True
  strength = rng.uniform(*p.class_strength, size=N)
  factor_v_N, factor_a_N = rng.uniform(*p.factor_strength, size=(2, N))
  is_kind = lambda name: world.kinds == KINDS.index(name)
  context_N = present_N & conj_N
  coef_rgb_N = (label_N & is_kind("visual")) * strength * p.class_amplitude[0]
  coef_rgb_N += context_N * sign_v_N * factor_v_N * p.factor_amplitude[0]
  coef_audio_N = (label_N & is_kind("audio")) * strength * p.class_amplitude[1]
  coef_audio_N += context_N * sign_a_N * factor_a_N * p.factor_amplitude[1]
  return label_N, coef_rgb_N, coef_audio_N


def _add_events(world: World, rng: np.random.Generator, label_N: np.ndarray, x_TxF) -> None:
  """Adds a short burst of each labelled event class's prototype, in place."""
  p = world.params
  T = x_TxF.shape[0]
  event_N = np.isin(world.kinds, (KINDS.index("visual_event"), KINDS.index("audio_event")))
  for n in np.flatnonzero(label_N & event_N):
    length = min(T, int(rng.integers(p.event_frames[0], p.event_frames[1] + 1)))
    start = int(rng.integers(0, T - length + 1))
    amplitude = p.event_amplitude * rng.uniform(*p.event_strength)
    proto = np.concatenate([world.rgb_protos[n], world.audio_protos[n]])
    x_TxF[start : start + length] += amplitude * proto


def _normal_table() -> np.ndarray:
  """256 equiprobable N(0, 1) quantiles, rescaled to unit variance."""
  table = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])
  return (table / table.std()).astype(np.float32)


_NORMAL_TABLE = _normal_table()


def _arma_coefficients(rho: float, weight: float) -> tuple[float, float]:
  """(a, b) with n_t = a e_t + b sum_k>=1 rho^k e_t-k: unit variance, lag-k corr weight rho^k."""
  # Var = a^2 + c and lag-k cov = rho^k (a b + c), with c = b^2 r and r = rho^2 / (1 - rho^2);
  # eliminating a gives (r^2 + r) b^4 - (1 + 2 weight r) b^2 + weight^2 = 0 (smaller root).
  r = rho**2 / (1 - rho**2)
  qa, qb, qc = r * r + r, 1 + 2 * weight * r, weight**2
  b = np.sqrt((qb - np.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa))
  return float(np.sqrt(1 - b * b * r)), float(b)


def _frame_noise(rng: np.random.Generator, T: int, width: int, rho: float, weight: float):
  """Unit-variance noise [T, width], correlated over time (truncated ARMA(1,1), see module)."""
  a, b = _arma_coefficients(rho, weight)
  raw = np.frombuffer(rng.bytes((T + _NOISE_TAPS) * width), np.uint8)
  e_TxF = _NORMAL_TABLE[raw].reshape(T + _NOISE_TAPS, width)
  # Recursive doubling: after shifts 1, 2, 4, 8 each row holds sum_{k<16} rho^k e_{t-k}.
  s_TxF = e_TxF.copy()
  for shift in (1, 2, 4, 8):
    s_TxF[shift:] += np.float32(rho**shift) * s_TxF[:-shift]
  out = s_TxF[_NOISE_TAPS:]
  out *= np.float32(b)
  out += np.float32(a - b) * e_TxF[_NOISE_TAPS:]
  return out
