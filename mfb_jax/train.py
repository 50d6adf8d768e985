"""Train state, optimizer, loss and the jitted train/eval steps on a ('data',) device mesh.

Parameters are replicated, batches are sharded along 'data'. The state is a plain pytree
(step, params, batch_stats, opt_state, rng): what orbax saves and what the step donates.

Shapes: B batch, T frames, D rgb dim, A audio dim, C classes, K top-k.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mfb_jax import metrics
from mfb_jax import model as model_lib

# Added to the probabilities inside the log, so that p = 0 or 1 costs at most -log(1e-6) = 13.8
# per class. The starter code adds 1e-5 (written `10e-6`); every figure in README.md was
# measured with 1e-6.
BCE_EPSILON = 1e-6


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def make_mesh() -> Mesh:
  """All devices of all processes on one 'data' axis.

  Auto axis types: shardings are propagated by the compiler from the explicit in/out shardings
  of the jitted steps, so model code needs no sharding annotations.
  """
  auto = (jax.sharding.AxisType.Auto,)
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=auto)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The configured schedule; the default is a constant 2e-4 (the paper gives the rate only)."""
  optim, steps = config.optim, config.train.num_steps
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.learning_rate)
  if optim.schedule == "cosine":
    return optax.cosine_decay_schedule(optim.learning_rate, decay_steps=steps)
  if optim.schedule == "exponential":  # Whole decays counted in integers: exact at any step.
    start, rate, every = optim.learning_rate, optim.decay_rate, optim.decay_steps
    return lambda step: start * rate ** (jnp.asarray(step) // every).astype(jnp.float32)
  return optax.warmup_cosine_decay_schedule(
    0.0, optim.learning_rate, warmup_steps=optim.warmup_steps, decay_steps=steps
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the configured schedule and optional global-norm clipping. The clipping keeps
  no state and adds no level to Adam's (as optax.chain would), so that a run can resume with it
  turned on or off: the remedy a diverged run's error line suggests."""
  optim = config.optim
  adam = optax.adam(learning_rate_schedule(config), b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.grad_clip_norm <= 0:
    return adam
  clip = optax.clip_by_global_norm(optim.grad_clip_norm)

  def update(grads, state, params=None):
    clipped, _ = clip.update(grads, clip.init(params))
    return adam.update(clipped, state, params)

  return optax.GradientTransformation(adam.init, update)


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int) -> tuple[jax.Array, ...]:
  """Zero inputs of the shapes the pipeline produces (T = 1 for video-level data)."""
  num_frames = frames_per_example(config)
  rgb_BxTxD = jnp.zeros((batch_size, num_frames, config.data.rgb_size), jnp.float32)
  audio_BxTxA = jnp.zeros((batch_size, num_frames, config.data.audio_size), jnp.float32)
  mask_BxT = jnp.ones((batch_size, num_frames), jnp.float32)
  return rgb_BxTxD, audio_BxTxA, mask_BxT


def frames_per_example(config: ml_collections.ConfigDict) -> int:
  return config.data.max_frames if config.data.format == "frame" else 1


def init_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation
) -> TrainState:
  """A fresh state from config.seed (pure: jit/eval_shape it)."""
  init_rng, dropout_rng, state_rng = jax.random.split(jax.random.key(config.seed), 3)
  variables = model.init(
    {"params": init_rng, "dropout": dropout_rng}, *dummy_inputs(config, 2), train=False
  )
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_rng),
  )


def abstract_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state, without allocating it."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: init_state(config, model, tx))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def state_initializer(
  config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> Callable[[], TrainState]:
  """The jitted function that returns a freshly initialized, replicated state (its memory can be
  checked before it first runs: memory.check_state_and_inputs)."""
  init_fn = lambda: init_state(config, model, tx)
  return jax.jit(init_fn, out_shardings=NamedSharding(mesh, P()))


def create_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """A freshly initialized state, created directly with replicated shardings."""
  return state_initializer(config, model, tx, mesh)()


def binary_cross_entropy(probs_BxC: jax.Array, labels_BxC: jax.Array) -> jax.Array:
  """Per-example BCE summed over classes, shape [B]."""
  probs_BxC = probs_BxC.astype(jnp.float32)
  loss_BxC = labels_BxC * jnp.log(probs_BxC + BCE_EPSILON) + (1.0 - labels_BxC) * jnp.log(
    1.0 - probs_BxC + BCE_EPSILON
  )
  return -jnp.sum(loss_BxC, axis=-1)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  with_norms: bool = False,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; returns the new state and scalar metrics.

  `with_norms` (static) adds grad_norm, update_norm and param_norm: each is a full pass over all
  parameters (85 ms of a 450 ms NetVLAD+MFB step on a 2-core CPU), so the trainer asks for them
  only on the steps whose metrics it logs.
  """
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    probs_BxC, mutated = model.apply(
      variables,
      batch["rgb"],
      batch["audio"],
      batch["mask"],
      train=True,
      rngs={"dropout": dropout_rng},
      mutable=["batch_stats", "losses"],
    )
    bce = jnp.mean(binary_cross_entropy(probs_BxC, batch["labels"]))
    regularization = sum(jnp.sum(x) for x in jax.tree.leaves(mutated.get("losses", {})))
    return bce + regularization, (bce, mutated.get("batch_stats", {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (bce, batch_stats)), grads = grad_fn(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  step_metrics = {"loss": loss, "bce": bce, "learning_rate": schedule(state.step)}
  if with_norms:
    step_metrics["grad_norm"] = optax.tree.norm(grads)
    step_metrics["update_norm"] = optax.tree.norm(updates)
    step_metrics["param_norm"] = optax.tree.norm(params)
  return new_state, step_metrics


def predict_probs(state: TrainState, batch: dict[str, jax.Array], model: nn.Module) -> jax.Array:
  """Eval-mode probabilities [B, C] (running BatchNorm statistics, no dropout)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return model.apply(variables, batch["rgb"], batch["audio"], batch["mask"], train=False)


def eval_step(
  state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module, top_k: int
) -> dict[str, jax.Array]:
  """Per-example metric summaries (top-k, hits, counts) of one global eval batch."""
  probs_BxC = predict_probs(state, batch, model).astype(jnp.float32)
  summary = metrics.summarize_batch(probs_BxC, batch["labels"], top_k)
  return {**summary, "valid": batch["valid"]}


def predict_step(
  state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module, top_k: int
) -> tuple[jax.Array, jax.Array]:
  """Top-k (scores [B, K], class ids [B, K]) of one global batch."""
  probs_BxC = predict_probs(state, batch, model).astype(jnp.float32)
  return jax.lax.top_k(probs_BxC, top_k)


def batch_shardings(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, mesh: Mesh) -> dict:
  """Shapes, dtypes and shardings of a global batch as the input pipeline's reach the step
  (features in model.dtype, records.feature_dtype), without allocating it."""
  T, C, data = frames_per_example(config), config.data.num_classes, config.data
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
    (batch_size, *shape), dtype, sharding=batch_shardings(mesh)
  )
  features = jnp.dtype(config.model.dtype)
  rgb, audio = spec((T, data.rgb_size), features), spec((T, data.audio_size), features)
  return {"rgb": rgb, "audio": audio, "mask": spec((T,)), "labels": spec((C,)), "valid": spec(())}


def _jit(step: Callable, mesh: Mesh, state_shapes, out_shardings, donate: bool = False, static=()):
  """`step(state, batch)` jitted with the state's shardings and a 'data'-sharded batch.

  `static`: positions of static arguments after (state, batch); they are passed positionally,
  since jit takes no keyword arguments when in_shardings are given.
  """
  state_sharding = jax.tree.map(lambda x: x.sharding, state_shapes)
  if callable(out_shardings):
    out_shardings = out_shardings(state_sharding)
  return jax.jit(
    step,
    in_shardings=(state_sharding, batch_shardings(mesh)),
    out_shardings=out_shardings,
    donate_argnums=(0,) if donate else (),
    static_argnums=static,
  )


def jit_train_step(config, model, tx, mesh, state_shapes) -> Callable:
  """train_step jitted with explicit shardings and a donated state.

  Call it as `fn(state, batch)` or `fn(state, batch, True)` (with the parameter norms); each
  variant is compiled on its first use.
  """
  step = functools.partial(train_step, model=model, tx=tx, schedule=learning_rate_schedule(config))
  outputs = lambda state_sharding: (state_sharding, NamedSharding(mesh, P()))
  return _jit(step, mesh, state_shapes, outputs, donate=True, static=(2,))


def jit_eval_step(config, model, mesh, state_shapes) -> Callable:
  """eval_step jitted; its summaries come back replicated so every process sees the split."""
  step = functools.partial(eval_step, model=model, top_k=config.eval.top_k)
  return _jit(step, mesh, state_shapes, NamedSharding(mesh, P()))


def jit_predict_step(config, model, mesh, state_shapes) -> Callable:
  """predict_step jitted; outputs stay sharded so each process reads back its own rows."""
  step = functools.partial(predict_step, model=model, top_k=config.predict.top_k)
  return _jit(step, mesh, state_shapes, batch_shardings(mesh))


def local_rows(global_array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in the order they were fed."""
  shards = sorted(global_array.addressable_shards, key=lambda s: s.index[0].start or 0)
  unique, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      unique.append(np.asarray(shard.data))
  return np.concatenate(unique, axis=0)


def model_name(config: ml_collections.ConfigDict) -> str:
  """The model as bench rows and messages name it: "netvlad+mfb+moe", "dbof+mfb+moe/bfloat16"."""
  m = config.model
  name = f"{m.aggregator}+{m.fusion}+{m.classifier}"
  if m.get("fusion_level", "video") == "frame":
    name = f"frame-{m.fusion}+{m.aggregator}+{m.classifier}"
  if m.get("context_gating", False):
    name += "+cg"
  if m.get("normalize_frames", False):
    name = f"unit-frames+{name}"
  return name + ("" if m.dtype == "float32" else f"/{m.dtype}")


def build(config: ml_collections.ConfigDict):
  """Model and optimizer from the config."""
  return model_lib.build_model(config), make_optimizer(config)
