"""Whether a compiled step fits in the memory its devices have left, checked before it first runs.

A batch too large for the machine otherwise ends badly: on a CPU, XLA takes the step's
temporaries from the host with an allocation the kernel grants lazily, so the process is killed by
the kernel's out-of-memory killer part-way through the step (no message; sometimes another process
goes with it); on an accelerator, XLA raises RESOURCE_EXHAUSTED, which names no setting.
`check_step` compiles the step ahead (the jitted function then runs that same executable, from
JAX's cache) and compares XLA's own estimate of what the step allocates beyond its arguments
(temporaries, and outputs not written in place) with what the devices have available. Before
that, `check_state_and_inputs` compares the state, the input pipeline's batches and the training
shuffle buffer, known from the config alone, with the same figures: a state, a batch or a buffer
beyond the machine (a huge data.num_classes, data.max_frames or data.shuffle_buffer) would
otherwise be killed, or hang, while it is being allocated. In training it then adds the train
step's temporaries and a checkpoint being saved, which all sit beside the full input
buffers once training runs (the step's own check sees only what is left while they fill).
"""

import math

import jax
import ml_collections
import numpy as np
from absl import logging

from mfb_jax import available_memory, cluster, errors, progress, runtime
from mfb_jax import train as train_lib
from mfb_jax.errors import ResourceError

_GB = 1e9


def amount(num_bytes: float) -> str:
  return f"{num_bytes / _GB:.1f} GB" if num_bytes >= 0.1 * _GB else f"{num_bytes / 1e6:.1f} MB"


def step_needs(compiled) -> int | None:
  """Bytes one device's execution of `compiled` allocates beyond its arguments (XLA's estimate),
  or None where the backend gives no estimate."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it.
    return None
  if stats is None:
    return None
  extra_outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
  return stats.temp_size_in_bytes + max(extra_outputs, 0)


def _on_host(needs: int) -> tuple[int, str]:
  """(bytes, words) for `needs` bytes of host memory in each process of this run on this host:
  they all take theirs from the same host."""
  n = cluster.host_processes()
  if n == 1:
    return needs, ""
  return (
    needs * n,
    f" in each of the {n} processes of this run on this host ({amount(needs * n)} in all)",
  )


def check_fits(jitted, args: tuple, what: str, settings: str) -> None:
  """Compiles `jitted(*args)` and raises ResourceError, one line naming `what` (e.g. "the train
  step of netvlad+mfb+moe at batch 128") and the `settings` that lower its memory, where XLA's
  estimate exceeds what the devices have left. A CPU's devices share the host's memory, and so
  do the processes of a run on one host."""
  compiled = jitted.lower(*args).compile()
  per_device = step_needs(compiled)
  local = jax.local_devices()
  if per_device is None or not local:
    return
  device = local[0]
  sharing = len(local) if device.platform == "cpu" else 1
  needs, available = per_device * sharing, available_memory.device_available(device)
  total, each = _on_host(needs) if device.platform == "cpu" else (needs, "")
  where = "the host" if device.platform == "cpu" else f"each {device.device_kind}"
  logging.info(
    "%s: needs about %s beyond its inputs (XLA's estimate); %s has %s available",
    what,
    amount(needs),
    where,
    "an unknown amount" if available is None else amount(available),
  )
  if available is not None and total > available:
    raise ResourceError(
      f"{what} needs about {amount(needs)} of memory beyond its parameters and inputs (XLA's "
      f"estimate){each}, but {where} has {amount(available)} available: lower {settings}"
    )


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or jax.ShapeDtypeStructs) of `tree`."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# Top-level parameter collections of the models (model.py) -> whose parameters they are and the
# config.model field naming the module (its section sizes them).
_PARTS = {
  "rgb_aggregator": ("the aggregators'", "aggregator"),
  "audio_aggregator": ("the aggregators'", "aggregator"),
  "fusion": ("the fusion's", "fusion"),
  "classifier": ("the classifier's", "classifier"),
  "fusion_gate": ("the context gates'", "context_gating"),  # The output gate is [C, C].
  "output_gate": ("the context gates'", "context_gating"),
}


def _largest_part(config: ml_collections.ConfigDict, state_shapes) -> str:
  """Where most of the parameters are, as the settings that size them ("; 99% of its parameters
  are the fusion's: model.mfb"), or "" where they are not in one of the model's named parts."""
  params = getattr(state_shapes, "params", None)
  if not isinstance(params, dict) or not tree_bytes(params):
    return ""
  parts = {}
  for name, tree in params.items():
    if name in _PARTS:
      parts[_PARTS[name]] = parts.get(_PARTS[name], 0) + tree_bytes(tree)
  if not parts:
    return ""
  (whose, field), size = max(parts.items(), key=lambda item: item[1])
  module = str(config.model[field])
  if field == "fusion" and config.model.get("fusion_level") == "frame":
    module = f"frame_{module}"
  settings = f"model.{module}" if module in config.model else f"model.{field}={module!r}"
  if field == "context_gating":  # A flag, not a module: its gates are [O, O] and [C, C].
    settings = "model.context_gating=False"
  percent = 100 * size // tree_bytes(params)  # Rounded down: "100%" only where it is all.
  return f"; {percent}% of its parameters are {whose}: {settings}"


def batch_bytes(config: ml_collections.ConfigDict, local_batch: int) -> int:
  """Bytes of one input batch of `local_batch` videos as the input pipeline hands it over:
  features in model.dtype, the frame mask, float32 multi-hot labels."""
  data = config.data
  frames = data.max_frames if data.format == "frame" else 1
  itemsize = 2 if config.model.dtype == "bfloat16" else 4  # config_checks.DTYPES.
  per_video = frames * ((data.rgb_size + data.audio_size) * itemsize + 4) + data.num_classes * 4
  return local_batch * per_video


_CONTEXT = 200  # A record's context (id, labels) and framing, a generous figure.

# A serialized record held in tf.data's shuffle buffer takes this much more of the host's memory
# (resident size with a 1,500-record buffer of 189 KB records: 201 KB a record).
_HELD_RECORD_OVERHEAD = 1.1


def record_bytes(config: ml_collections.ConfigDict) -> int:
  """About how many bytes one serialized record of exactly data.max_frames frames takes: uint8
  frames with the headers the official writers put before each, or float32 video-level means
  (the bench's synthetic records; only the end-to-end figure, which needs TensorFlow, asks)."""
  data = config.data
  if data.format == "frame":
    from mfb_jax.frame_layout import frame_header  # Imports TensorFlow.

    per_frame = sum(len(frame_header(size)) + size for size in (data.rgb_size, data.audio_size))
    return data.max_frames * per_frame + _CONTEXT
  return 4 * (data.rgb_size + data.audio_size) + _CONTEXT


def _listed(parts: list[str], word: str = "and") -> str:
  """'a', 'a and b', 'a, b and c' (or `word` for 'and')."""
  return f" {word} ".join(filter(None, [", ".join(parts[:-1]), parts[-1]]))


def check_start(
  state: tuple[int, str], inputs: tuple[int, list[str], str], state_settings: str
) -> None:
  """Raises ResourceError, one line naming what does not fit and the settings to lower, where
  the state (bytes on each local device, what it is) and the input pipeline's buffers (bytes on
  the host, what each is, their settings) cannot be held: checked before either is allocated.
  A CPU's devices share the host's memory, so there they count together, and so do the processes
  of a run on one host."""
  local = jax.local_devices()
  device = local[0]
  state_bytes, state_what = state
  input_bytes, inputs_what, input_settings = inputs
  host = available_memory.host_available()
  if device.platform == "cpu":
    if len(local) > 1:  # Each device holds its own.
      state_what += f" on each of the {len(local)} devices"
    what, settings = _listed([state_what, *inputs_what]), f"{input_settings}, or {state_settings}"
    parts = [(state_bytes * len(local) + input_bytes, host, "the host", what, settings)]
  else:
    where, on_device = f"each {device.device_kind}", available_memory.device_available(device)
    parts = [
      (state_bytes, on_device, where, state_what, state_settings),
      (input_bytes, host, "the host", _listed(inputs_what), input_settings),
    ]
  for needs, available, where, what, settings in parts:
    total, each = _on_host(needs) if where == "the host" else (needs, "")
    if available is not None and total > available:
      raise ResourceError(
        f"{what} need about {amount(needs)} of memory{each}, but {where} has {amount(available)} "
        f"available: lower {settings}"
      )


def check_step(
  config: ml_collections.ConfigDict, jitted, args: tuple, step: str, variant: str = ""
) -> None:
  """Compiles `jitted(*args)`, the "train", "eval" or "predict" step (`variant`: which of its
  compiled forms, named in the log line), and refuses it (a ResourceError on every process
  alike) where it needs more memory than the devices have left."""
  section = "train" if step == "train" else "eval"  # Predict batches are eval.batch_size too.
  frames = " or data.max_frames" if config.data.format == "frame" else ""
  settings = f"{section}.batch_size{frames}"
  if step == "train" and config.model.dtype == "float32":
    settings += ", or set model.dtype=bfloat16"
  what = f"the {step} step of {train_lib.model_name(config)} at batch {config[section].batch_size}"
  what += f" {variant}" if variant else ""
  errors.agreed(lambda: check_fits(jitted, args, what, settings))


# An asynchronous checkpoint copies the state to the host, then encodes it while the next steps
# run: saving a 3.6 GB state raised the peak by 5.9 GB (glibc's allocator; 2-core AMD Zen 5).
_SAVE_COPIES = 2


def held_batches(config: ml_collections.ConfigDict) -> int:
  """How many whole input batches the host holds at once: data.prefetch_batches prefetched, one
  per batch-sized tf.data map call (runtime.batch_calls(): parsed and waiting, or being parsed),
  2 for those calls' serialized records and uint8 frames and the allocator's slack, the batch
  being handed over, and the progress.STEPS_AHEAD steps' batches before it. Measured on 2 cores
  (two calls; a slow consumer, so every buffer full): 5.8-6.5 batches with the consumer's one, of
  the 7 counted before the steps' (tests/test_memory_held.py; README.md, "Training on
  YouTube-8M")."""
  calls = runtime.batch_calls()
  return config.data.prefetch_batches + calls + 2 + 1 + progress.STEPS_AHEAD


def check_state_and_inputs(
  config: ml_collections.ConfigDict,
  state_shapes,
  mode: str,
  init=None,
  shuffled_record_bytes: int = 0,
  with_eval: bool = False,
  extra_batches: int = 0,
  step: tuple | None = None,
  saves: bool = False,
  pipeline: bool = True,
):
  """Refuses (ResourceError) a state and input buffers that the devices cannot hold, before they
  are allocated: the state with its optimizer moments, restored, or as `init` (state_initializer)
  creates it, with its temporaries; the batches the input pipeline holds (held_batches) of the
  "train" or the "eval" (eval and predict) batch size; and, given the serialized size of a
  training record, the data.shuffle_buffer records of the shuffle buffer (with tf.data's and the
  allocator's overhead). with_eval: training that evaluates, whose eval batches are held beside
  the training batches. extra_batches: more batches of the same size (the bench's in-memory ones);
  pipeline=False: no input pipeline (the bench's bare step), only those.
  step: (jitted train step, abstract arguments), whose temporaries (XLA's estimate, compiled
  here; the call then reuses it) sit beside the state and the batches while it runs; checked
  after the rest, which needs no compilation. saves: training, whose asynchronous checkpoints
  copy the state to the host and encode it while the next steps run."""
  section = "train" if mode == "train" else "eval"
  local = lambda section: max(config[section].batch_size // jax.process_count(), 1)
  local_batch = local(section)
  held = (held_batches(config) if pipeline else 0) + extra_batches
  # Initializing needs the state and its temporaries (XLA's estimate, where the backend has one).
  initializing = init is not None and step_needs(init.lower().compile())
  state = tree_bytes(state_shapes)
  name = train_lib.model_name(config)
  batches = held * batch_bytes(config, local_batch)
  inputs = [f"{held} input batches of {local_batch} videos ({amount(batches)})"]
  frame_level = config.data.format == "frame"
  step_names = [f"{section}.batch_size", *(["data.max_frames"] if frame_level else [])]
  batch_names = step_names + (["data.prefetch_batches"] if pipeline else [])
  settings = f"{_listed(batch_names, 'or')} (the batches)"
  host_bytes = batches
  if with_eval:
    eval_batch = local("eval")
    eval_batches = held * batch_bytes(config, eval_batch)
    host_bytes += eval_batches
    inputs.append(f"{held} eval batches of {eval_batch} videos ({amount(eval_batches)})")
    settings = settings.replace("train.batch_size", "train.batch_size, eval.batch_size")
  if saves:  # On the host, on an accelerator too.
    host_bytes += _SAVE_COPIES * state
    inputs.append(f"a checkpoint being saved ({amount(_SAVE_COPIES * state)})")
  if shuffled_record_bytes:
    buffer = int(config.data.shuffle_buffer * shuffled_record_bytes * _HELD_RECORD_OVERHEAD)
    host_bytes += buffer
    inputs.append(f"a shuffle buffer of {config.data.shuffle_buffer} videos ({amount(buffer)})")
    settings += ", data.shuffle_buffer (the shuffle buffer)"
  state_settings = (
    f"data.num_classes or the model's sizes (the state{_largest_part(config, state_shapes)})"
  )
  if saves and jax.local_devices()[0].platform != "cpu":  # On a CPU the state's settings follow.
    settings += ", or data.num_classes or the model's sizes (the checkpoint)"
  inputs_part = (host_bytes, inputs, settings)
  running = [(state, f"the state of {name} ({amount(state)})")]
  if initializing:
    running.append(
      (initializing, f"the state of {name} as it is initialized ({amount(initializing)})")
    )
  check_start(max(running), inputs_part, state_settings)
  temporaries = step is not None and step_needs(step[0].lower(*step[1]).compile())
  if temporaries:
    what = f"the state of {name} and its train step's temporaries ({amount(state + temporaries)})"
    running.append((state + temporaries, what))
    if max(running)[1] == what:  # Not the initialization's.
      step_settings = f"{_listed(step_names, 'or')} (the step)"
      state_settings = f"{step_settings}, or {state_settings}"
      if config.model.dtype == "float32":
        state_settings += ", or set model.dtype=bfloat16"
    check_start(max(running), inputs_part, state_settings)
