"""The memory check before a step first runs (mfb_jax/memory.py), against sizes known by hand."""

import glob
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mfb_jax import available_memory, bench, evaluate, memory, predict, trainer
from mfb_jax import train as train_lib
from mfb_jax.errors import ResourceError

MB = 1_000_000


def test_an_output_not_written_in_place_counts_and_a_donated_one_does_not():
  x = jnp.ones((1000, 1000), jnp.float32)  # 4 MB.
  fresh = jax.jit(lambda a: a * 2.0).lower(x).compile()
  in_place = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()
  assert memory.step_needs(fresh) >= 4 * MB
  assert memory.step_needs(in_place) < 4 * MB
  # A product of two 4 MB matrices plus one: the product is a temporary or written in place.
  assert 4 * MB <= memory.step_needs(jax.jit(lambda a: a @ a + 1.0).lower(x).compile()) <= 8 * MB


def test_a_step_that_does_not_fit_is_one_line_naming_what_and_the_settings(monkeypatch):
  x = jnp.ones((1000, 1000), jnp.float32)
  step = jax.jit(lambda a: a * 2.0)
  devices = len(jax.local_devices())  # A CPU's devices share the host's memory.
  monkeypatch.setattr(available_memory, "device_available", lambda device: 3 * MB)
  with pytest.raises(ResourceError) as raised:
    memory.check_fits(step, (x,), "the doubling step", "the size of a")
  message = str(raised.value)
  assert "\n" not in message
  needs = memory.step_needs(step.lower(x).compile()) * devices
  assert f"the doubling step needs about {needs / 1e6:.1f} MB of memory" in message
  assert message.endswith("the host has 3.0 MB available: lower the size of a")
  monkeypatch.setattr(available_memory, "device_available", lambda device: needs)
  memory.check_fits(step, (x,), "the doubling step", "the size of a")  # Just fits.
  monkeypatch.setattr(available_memory, "device_available", lambda device: None)
  memory.check_fits(step, (x,), "the doubling step", "the size of a")  # Unknown: no check.


def test_processes_of_a_run_on_one_host_count_their_memory_together(monkeypatch):
  x = jnp.ones((1000, 1000), jnp.float32)
  step = jax.jit(lambda a: a * 2.0)
  needs = memory.step_needs(step.lower(x).compile()) * len(jax.local_devices())
  monkeypatch.setattr(available_memory, "device_available", lambda device: 2 * needs)
  memory.check_fits(step, (x,), "the doubling step", "the size of a")  # One process: fits.
  monkeypatch.setattr(memory.cluster, "_host_processes", 3)
  with pytest.raises(ResourceError) as raised:
    memory.check_fits(step, (x,), "the doubling step", "the size of a")
  assert (
    f"estimate) in each of the 3 processes of this run on this host ({3 * needs / 1e6:.1f} MB "
    "in all), but the host has"
  ) in str(raised.value)
  # The start-up check: state and buffers of 600 bytes in each of 3 processes, 1000 available.
  monkeypatch.setattr(available_memory, "host_available", lambda: 1000)
  with pytest.raises(ResourceError) as raised:
    memory.check_start((100, "the state"), (500, ["the batches"], "b"), "s")
  n_devices = len(jax.local_devices())
  each = 100 * n_devices + 500
  assert str(raised.value) == (
    f"the state and the batches need about {each / 1e6:.1f} MB of memory in each of the 3 "
    f"processes of this run on this host ({3 * each / 1e6:.1f} MB in all), but the host has "
    "0.0 MB available: lower b, or s"
  )
  monkeypatch.setattr(memory.cluster, "_host_processes", 1)
  memory.check_start((100, "the state"), (500, ["the batches"], "b"), "s")


def _no_memory(monkeypatch):
  """A host with no memory for any step, but the start-up check passed (tested on its own)."""
  monkeypatch.setattr(available_memory, "host_available", lambda: 1000)
  monkeypatch.setattr(memory, "check_start", lambda *args: None)


def test_state_and_batch_bytes_by_hand(tiny_config):
  tree = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.bfloat16)}
  assert memory.tree_bytes(tree) == 3 * 4 * 4 + 5 * 2
  tiny_config.data.update(max_frames=10, rgb_size=6, audio_size=3, num_classes=10)
  # Per video: 10 frames of 9 float32 features and a float32 mask entry, 10 float32 labels.
  assert memory.batch_bytes(tiny_config, 8) == 8 * (10 * (9 * 4 + 4) + 10 * 4)
  tiny_config.model.dtype = "bfloat16"
  assert memory.batch_bytes(tiny_config, 8) == 8 * (10 * (9 * 2 + 4) + 10 * 4)
  tiny_config.data.format = "video"  # One mean vector per video.
  assert memory.batch_bytes(tiny_config, 8) == 8 * ((9 * 2 + 4) + 10 * 4)


def _training_refused_on_8_gb(config, tmp_path, monkeypatch) -> str:
  """The ResourceError line of training `config` on a host with 8 GB available."""
  monkeypatch.setattr(available_memory, "host_available", lambda: 8 * 10**9)
  with pytest.raises(ResourceError) as raised:
    trainer.train_and_evaluate(config, str(tmp_path))
  return str(raised.value)


def test_a_state_beyond_the_host_stops_training_before_it_is_allocated(
  tiny_config, tmp_path, monkeypatch
):
  # data.num_classes=20000000: the process was killed (exit 137, no message) or hung, unkillable,
  # while it initialized the MoE's parameters.
  tiny_config.data.num_classes = 20_000_000
  message = _training_refused_on_8_gb(tiny_config, tmp_path, monkeypatch)
  model = tiny_config.model
  name = f"{model.aggregator}+{model.fusion}+moe"
  assert message.startswith(f"the state of {name} as it is initialized (")
  assert "need about " in message and "but the host has 8.0 GB available: lower" in message
  # The MoE's experts and gates, 2 x 20M x 64 parameters, against about 0.33M in the others.
  sizes = "the model's sizes (the state; 99% of its parameters are the classifier's: model.moe)"
  assert message.endswith(f"or data.num_classes or {sizes}")
  # At least the state itself: the MoE's [*, 20M] arrays, each with two Adam moments.
  state_gb = float(message.split("initialized (")[1].split(" GB")[0])
  model_, tx = train_lib.build(tiny_config)
  shapes = train_lib.abstract_state(tiny_config, model_, tx, train_lib.make_mesh())
  assert state_gb * 1e9 >= 3 * memory.tree_bytes(shapes.params)  # Parameters, Adam's mu and nu.
  assert not (tmp_path / "checkpoints").exists()
  with pytest.raises(ResourceError, match=r"^the state of .*the host has 8\.0 GB available"):
    bench.fresh_train_step(tiny_config)  # --mode=bench


def test_record_bytes_covers_an_official_record_with_room_only_for_its_context(tiny_config):
  import tensorflow as tf

  def frames(size):  # Frames as the official writers store them: one bytes value each.
    value = lambda: tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(size)]))
    return tf.train.FeatureList(feature=[value() for _ in range(10)])

  labels = tf.train.Feature(int64_list=tf.train.Int64List(value=[4, 400, 3861]))
  context = {"id": _bytes(b"Ab1c"), "labels": labels}
  record = tf.train.SequenceExample(
    context=tf.train.Features(feature=context),
    feature_lists=tf.train.FeatureLists(feature_list={"rgb": frames(1024), "audio": frames(128)}),
  ).SerializeToString()
  tiny_config.data.update(format="frame", max_frames=10, rgb_size=1024, audio_size=128)
  # The frames and their headers exactly; the rest is a context allowance of 200 bytes.
  frames_bytes = memory.record_bytes(tiny_config) - 200
  assert frames_bytes == 10 * (1024 + 128 + 2 * 9)
  assert frames_bytes < len(record) <= frames_bytes + 200
  means = lambda n: tf.train.Feature(float_list=tf.train.FloatList(value=[0.5] * n))
  video = tf.train.Example(
    features=tf.train.Features(
      feature={**context, "mean_rgb": means(1024), "mean_audio": means(128)}
    )
  ).SerializeToString()
  tiny_config.data.format = "video"
  assert 4 * (1024 + 128) < len(video) <= memory.record_bytes(tiny_config) <= len(video) + 200


def _bytes(value: bytes):
  import tensorflow as tf

  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _first_records_mean(path: str, n: int) -> int:
  """The mean size of a tfrecord file's first n records, from its framing (length, CRC, data,
  CRC), read without TensorFlow."""
  sizes = []
  with open(path, "rb") as f:
    while len(sizes) < n and (header := f.read(12)):
      size = int.from_bytes(header[:8], "little")
      f.seek(size + 4, 1)
      sizes.append(size)
  return sum(sizes) // len(sizes)


def test_a_shuffle_buffer_beyond_the_host_stops_training_before_it_fills(
  tiny_config, tmp_path, monkeypatch
):
  # data.shuffle_buffer=100000 of real 2018 records is about 27 GB, reached minutes into training.
  tiny_config.data.shuffle_buffer = 10_000_000
  message = _training_refused_on_8_gb(tiny_config, tmp_path, monkeypatch)
  first = sorted(glob.glob(tiny_config.data.train_pattern))[0]
  record = _first_records_mean(first, 32)  # Whatever max_frames is: records are held whole.
  buffer_gb = int(10_000_000 * record * 1.1) / 1e9
  assert f"and a shuffle buffer of 10000000 videos ({buffer_gb:.1f} GB) need about" in message
  assert (
    "data.prefetch_batches (the batches), data.shuffle_buffer (the shuffle buffer), or" in message
  )
  assert not (tmp_path / "checkpoints").exists()
  tiny_config.data.shuffle_buffer = 1000  # The same host holds a buffer of usual size.
  memory.check_state_and_inputs(tiny_config, _shapes(tiny_config), "train", None, record)
  # Training that evaluates holds eval batches beside its own: a huge eval batch (or frames) was
  # found only at the first evaluation, after a checkpoint, as an exit 1 or the OOM killer.
  tiny_config.eval.batch_size = 10_000_000
  with pytest.raises(ResourceError) as raised:
    memory.check_state_and_inputs(tiny_config, _shapes(tiny_config), "train", None, record, True)
  assert f"{memory.held_batches(tiny_config)} eval batches of 10000000 videos (" in str(
    raised.value
  )
  assert "lower train.batch_size, eval.batch_size, data.max_frames or" in str(raised.value)


def test_on_an_accelerator_the_state_and_the_host_buffers_are_refused_apart(
  tiny_config, monkeypatch
):
  device = types.SimpleNamespace(platform="gpu", device_kind="H100")
  monkeypatch.setattr(memory.jax, "local_devices", lambda: [device])
  check = lambda: memory.check_state_and_inputs(
    tiny_config, _shapes(tiny_config), "train", None, 10**6
  )
  monkeypatch.setattr(available_memory, "device_available", lambda device: 10**12)
  monkeypatch.setattr(available_memory, "host_available", lambda: 1000)
  with pytest.raises(ResourceError) as raised:
    check()
  held = memory.held_batches(tiny_config)
  assert str(raised.value).startswith(f"{held} input batches of 8 videos (")
  assert "but the host has 0.0 MB available" in str(raised.value)
  assert str(raised.value).endswith("data.shuffle_buffer (the shuffle buffer)")
  monkeypatch.setattr(available_memory, "device_available", lambda device: 1000)
  monkeypatch.setattr(available_memory, "host_available", lambda: 10**12)
  with pytest.raises(ResourceError) as raised:
    check()
  assert str(raised.value).startswith("the state of ")
  assert "need about" in str(raised.value) and "but each H100 has 0.0 MB available" in str(
    raised.value
  )
  # tiny netvlad+mfb: MFB's U and V hold 295,168 of the 334,608 parameter bytes (88.2%).
  sizes = "the model's sizes (the state; 88% of its parameters are the fusion's: model.mfb)"
  assert str(raised.value).endswith(f"lower data.num_classes or {sizes}")
  # Training's checkpoint is saved from the host: only the model's sizes lower it there.
  monkeypatch.setattr(available_memory, "device_available", lambda device: 10**12)
  monkeypatch.setattr(available_memory, "host_available", lambda: 1000)
  with pytest.raises(ResourceError) as raised:
    memory.check_state_and_inputs(tiny_config, _shapes(tiny_config), "train", saves=True)
  assert " and a checkpoint being saved (" in str(raised.value)
  assert str(raised.value).endswith("or data.num_classes or the model's sizes (the checkpoint)")


def _shapes(config):
  model, tx = train_lib.build(config)
  return train_lib.abstract_state(config, model, tx, train_lib.make_mesh())


def test_training_that_does_not_fit_stops_before_its_first_step(tiny_config, tmp_path, monkeypatch):
  _no_memory(monkeypatch)
  model = tiny_config.model
  with pytest.raises(ResourceError) as raised:
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert str(raised.value).startswith(
    f"the train step of {model.aggregator}+{model.fusion}+moe at batch 8 needs about"
  )
  assert str(raised.value).endswith(
    "available: lower train.batch_size or data.max_frames, or set model.dtype=bfloat16"
  )
  assert not list(tmp_path.glob("checkpoints/*"))  # Nothing saved.
  # The variant of logged steps is named: the two variants' lines looked like one step's
  # estimate given twice, with different figures.
  tiny_config.train.log_every = 1
  with pytest.raises(ResourceError) as raised:
    trainer.train_and_evaluate(tiny_config, str(tmp_path))
  assert str(raised.value).startswith(
    f"the train step of {model.aggregator}+{model.fusion}+moe at batch 8 with the parameter "
    "norms (logged steps) needs about"
  )


def test_eval_and_predict_that_do_not_fit_name_eval_batch_size(
  tiny_config, trained_workdir, monkeypatch
):
  _no_memory(monkeypatch)
  with pytest.raises(ResourceError, match=r"the eval step of .* lower eval.batch_size or data"):
    evaluate.run_eval(tiny_config, str(trained_workdir))
  with pytest.raises(ResourceError, match=r"the predict step of .* lower eval.batch_size or data"):
    predict.run_predict(tiny_config, str(trained_workdir))
  assert not (trained_workdir / predict.PREDICTIONS_FILE).exists()


def test_eval_and_predict_check_the_state_before_restoring_it(
  tiny_config, trained_workdir, monkeypatch
):
  monkeypatch.setattr(available_memory, "host_available", lambda: 1000)
  settings = r"lower eval.batch_size, data.max_frames or data.prefetch_batches \(the batches\)"
  for run in (evaluate.run_eval, predict.run_predict):
    with pytest.raises(ResourceError, match=rf"^the state of .* {settings}, or data.num_classes"):
      run(tiny_config, str(trained_workdir))


def test_the_state_line_names_where_most_parameters_are():
  config = default.get_config()
  config.model.update(aggregator="netvlad", fusion="mfb", classifier="moe")
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  params = {"rgb_aggregator": {"w": f32(10)}, "audio_aggregator": {"w": f32(10)}}
  params.update(fusion={"U": f32(5, 6)}, classifier={"experts": f32(20)}, fusion_gate={"w": f32(3)})
  state = types.SimpleNamespace(params=params)  # Fusion 30 of 73 values: 41.1%, rounded down.
  assert (
    memory._largest_part(config, state) == "; 41% of its parameters are the fusion's: model.mfb"
  )
  params["rgb_aggregator"]["w"] = f32(40)  # The two aggregators together: 50 of 103.
  assert memory._largest_part(config, state) == (
    "; 48% of its parameters are the aggregators': model.netvlad"
  )
  config.model.fusion_level, params["fusion"]["U"] = "frame", f32(100)  # A frame-level fusion.
  assert memory._largest_part(config, state).endswith("are the fusion's: model.frame_mfb")
  config.model.update(fusion_level="video", fusion="mine")  # A user's module without a section.
  assert memory._largest_part(config, state).endswith("are the fusion's: model.fusion='mine'")
  params["output_gate"] = {"w": f32(1000)}  # Context gating's [C, C] gate.
  assert memory._largest_part(config, state).endswith("gates': model.context_gating=False")
  assert memory._largest_part(config, types.SimpleNamespace(params={"gate": {"w": f32(3)}})) == ""


def test_on_several_cpu_devices_each_holds_the_state(monkeypatch):
  devices = [types.SimpleNamespace(platform="cpu")] * 3
  monkeypatch.setattr(memory.jax, "local_devices", lambda: devices)
  monkeypatch.setattr(available_memory, "host_available", lambda: MB)
  with pytest.raises(ResourceError) as raised:
    memory.check_start((400_000, "the state"), (500_000, ["the batches"], "b"), "s")
  assert str(raised.value).startswith(  # 3 x 0.4 + 0.5 MB.
    "the state on each of the 3 devices and the batches need about 1.7 MB of memory"
  )
  memory.check_start((100_000, "the state"), (500_000, ["the batches"], "b"), "s")  # 0.8 MB.
