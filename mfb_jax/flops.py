"""Analytic training FLOPs per example of the paper models (matmuls only: the floor).

A dense layer with n inputs and m outputs costs 2nm per row forward and 2nm per gradient it must
produce backward: the weight gradient always, the input gradient only when something upstream has
parameters (nobody needs the gradient of the data). Element-wise work is left out, so the floor
`peak / flops_per_example` is an upper bound on examples/sec no implementation can beat.
Checked against the project's design figures (issue 7 of its tracker): NetVLAD+MFB 367 MFLOP
(572 ex/s at 210 GFLOP/s), DBoF+MFB 2.98 GFLOP (70 ex/s).
Also covers the modules beyond the paper: NeXtVLAD, MFH, frame-level MFB, context gating.
"""

import time

import ml_collections


def _dense(rows: int, n: int, m: int, input_grad: bool) -> int:
  return 2 * rows * n * m * (3 if input_grad else 2)


def _frames(config: ml_collections.ConfigDict) -> int:
  return config.data.max_frames if config.data.format == "frame" else 1


def _aggregate(
  config: ml_collections.ConfigDict, dim: int, input_grad: bool = False
) -> tuple[int, int, bool]:
  """(flops, output dim, has params) of one aggregation of `dim`-wide frames.

  `input_grad`: the frames come from a layer with parameters (frame-level fusion), so the
  gradient w.r.t. them is needed too.
  """
  T = _frames(config)
  name = config.model.aggregator
  if name == "dbof":
    hidden = config.model.dbof.hidden_size
    return _dense(T, dim, hidden, input_grad), hidden, True
  if name == "netvlad":
    K = config.model.netvlad.num_clusters
    assign = _dense(T, dim, K, input_grad)
    # VLAD = assign^T @ frames: forward, the gradient w.r.t. the assignments (and the frames).
    return assign + (3 if input_grad else 2) * (2 * T * K * dim), K * dim, True
  if name == "nextvlad":
    cfg = config.model.nextvlad
    X, G, K = cfg.expansion * dim, cfg.groups, cfg.num_clusters
    expand = _dense(T, dim, X, input_grad)
    # Attention and assignment read the expanded frames, which have parameters upstream.
    gates = _dense(T, X, G, True) + _dense(T, X, G * K, True)
    # VLAD over T*G descriptors of X/G values: 2*T*K*X forward, and both gradients.
    return expand + gates + 3 * (2 * T * K * X), K * X // G, True
  return 0, dim, False  # avgpool (and unknown aggregators: counted as free).


def _fuse(config, video, audio) -> tuple[int, int]:
  """(flops, fused dim) of the fusion, given (flops, dim, has_params) of each modality."""
  (_, dv, pv), (_, da, pa) = video, audio
  name = config.model.fusion
  if name in ("mfb", "mfh"):
    section = config.model[name]
    width = section.factor * section.output_dim
    blocks = section.order if name == "mfh" else 1
    flops = blocks * (_dense(1, dv, width, pv) + _dense(1, da, width, pa))
    return flops, blocks * section.output_dim
  if name == "fc_concat":
    width = config.model.fc_concat.hidden_size
    return _dense(1, dv, width, pv) + _dense(1, da, width, pa), 2 * width
  if name == "video":
    return 0, dv
  if name == "audio":
    return 0, da
  return 0, dv + da  # concat


def _video_level(config: ml_collections.ConfigDict) -> tuple[int, int, bool]:
  """(flops, fused dim, has params) of per-modality aggregation and fusion (the paper)."""
  video = _aggregate(config, config.data.rgb_size)
  audio = _aggregate(config, config.data.audio_size)
  fuse_flops, fused_dim = _fuse(config, video, audio)
  uses = {"video": (video,), "audio": (audio,)}.get(config.model.fusion, (video, audio))
  has_params = fuse_flops > 0 or any(p for _, _, p in uses)
  return fuse_flops + sum(flops for flops, _, _ in uses), fused_dim, has_params


def _frame_level(config: ml_collections.ConfigDict) -> tuple[int, int, bool]:
  """(flops, aggregated dim, True) of MFB on every frame, then aggregation of the fused frames."""
  section = config.model.frame_mfb
  T, width = _frames(config), section.factor * section.output_dim
  fuse = _dense(T, config.data.rgb_size, width, False) + _dense(
    T, config.data.audio_size, width, False
  )
  agg_flops, dim, _ = _aggregate(config, section.output_dim, input_grad=True)
  return fuse + agg_flops, dim, True


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Matmul FLOPs of one example's forward and backward pass."""
  if config.model.get("fusion_level", "video") == "frame":
    total, fused_dim, has_params = _frame_level(config)
  else:
    total, fused_dim, has_params = _video_level(config)
  C = config.data.num_classes
  gated = config.model.get("context_gating", False)
  if gated:  # y = sigmoid(W x + b) * x on the fused vector: W is fused_dim x fused_dim.
    total += _dense(1, fused_dim, fused_dim, input_grad=has_params)
    has_params = True
  # The head's input gradient is needed only when something before it has weights (not for
  # avgpool with audio, video or concat).
  if config.model.classifier == "moe":
    E = config.model.moe.num_experts
    total += _dense(1, fused_dim, C * (2 * E + 1), input_grad=has_params)
  else:
    total += _dense(1, fused_dim, C, input_grad=has_params)
  if gated:  # On the probabilities: C x C, after the classifier's weights.
    total += _dense(1, C, C, input_grad=True)
  return total


def peak_product(dtype: str = "float32"):
  """The jitted square product the peak is measured on, in the form the models' layers use: a
  narrow dtype (bfloat16) accumulates and returns float32 (XLA:CPU runs bf16 x bf16 -> f32
  natively on bf16 hardware, AMX included, but widens a product with a bf16 result to float32,
  which would measure the float32 peak)."""
  import jax
  import jax.numpy as jnp

  wide = jnp.finfo(jnp.dtype(dtype)).bits >= 32
  accumulation = None if wide else jnp.float32
  return jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=accumulation))


def measure_matmul_peak(
  dtype: str = "float32", size: int | None = None, repeats: int = 10
) -> float:
  """Best observed GFLOP/s of a square jitted matmul on the default device.

  size: by default 2048 on a CPU (0.1 s a product) and 8192 on an accelerator, where a 2048
  product takes tens of microseconds and the launch and synchronization would weigh in the figure.
  """
  import jax
  import jax.numpy as jnp

  if size is None:
    size = 2048 if jax.default_backend() == "cpu" else 8192

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  matmul = peak_product(dtype)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9
