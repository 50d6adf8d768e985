"""The optimizer: Adam with optional global-norm clipping, which a resumed run may turn on."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import default
from mfb_jax import checkpoint as checkpoint_lib
from mfb_jax import train as train_lib
from mfb_jax import trainer


def _optimizer(clip: float) -> optax.GradientTransformation:
  config = default.get_config()
  config.optim.update(grad_clip_norm=clip, learning_rate=0.1, schedule="constant")
  return train_lib.make_optimizer(config)


def test_clipping_scales_gradients_above_the_norm_and_keeps_adams_state():
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  big = {"w": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([0.0, 12.0])}  # Global norm 13.
  small = {"w": jnp.array([0.1, 0.2, 0.0]), "b": jnp.array([0.0, -0.2])}  # Norm 0.3: kept.
  plain, clipped = _optimizer(0.0), _optimizer(1.0)
  # Adam's state alone, as without clipping: a checkpoint of either run fits the other.
  assert jax.tree.structure(clipped.init(params)) == jax.tree.structure(plain.init(params))

  def run(tx, gradients):
    state, steps = tx.init(params), []
    for g in gradients:
      update, state = tx.update(g, state, params)
      steps.append(update)
    return steps

  # Independently: g * min(1, c / ||g||) by hand, fed to plain Adam.
  scale = lambda g, c: jax.tree.map(lambda x: x * min(1.0, c / 13.0), g)
  expected = run(plain, [scale(big, 1.0), small])
  got = run(clipped, [big, small])
  for e, g in zip(expected, got, strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), e, g)
  # Adam's moments remember the clipped first step: without clipping the second step differs.
  unclipped = run(plain, [big, small])[1]
  assert not np.allclose(unclipped["b"], got[1]["b"], rtol=1e-3)


def test_a_run_resumes_with_clipping_turned_on_and_is_evaluated_with_it_off(
  tiny_config, tmp_path, monkeypatch
):
  # The error line of a diverged run says "set optim.grad_clip_norm"; with the clipping a level of
  # optax.chain, the resumed run was refused: "it has an array opt_state/[0]/count that the
  # configured model lacks".
  tiny_config.train.update(num_steps=3, eval_every=100)
  trainer.train_and_evaluate(tiny_config, str(tmp_path))
  clipped = tiny_config.copy_and_resolve_references()
  clipped.optim.grad_clip_norm = 0.5
  clipped.train.num_steps = 6
  warnings = []
  monkeypatch.setattr(trainer.logging, "warning", lambda text, *a: warnings.append(text % a))
  trainer.train_and_evaluate(clipped, str(tmp_path))
  # config.json now holds the new settings: the log keeps what changed.
  changed = "resuming with settings changed since this workdir's last run: optim.grad_clip_norm"
  assert f"{changed} 0.0 -> 0.5" in warnings
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == [3, 6]
  mesh = train_lib.make_mesh()
  model, tx = train_lib.build(tiny_config)  # Clipping off again: the same state.
  shapes = train_lib.abstract_state(tiny_config, model, tx, mesh)
  state = checkpoint_lib.Checkpointer(str(tmp_path)).restore(shapes)
  assert int(state.step) == 6


def test_a_checkpoint_saved_with_clipping_as_a_chain_is_restored(tmp_path):
  # Until the clipping kept Adam's state alone, a clipped run saved optax.chain's state: an empty
  # state, then Adam's. Such workdirs were refused ("it has no array opt_state/[0]/count").
  params = {"w": jnp.arange(3.0)}
  adam = _optimizer(0.0)
  _, adam_state = adam.update({"w": jnp.ones(3)}, adam.init(params), params)  # count = 1.
  state = train_lib.TrainState(
    step=jnp.array(7, jnp.int32),
    params=params,
    batch_stats={},
    opt_state=adam_state,
    rng=jnp.zeros(2, jnp.uint32),
  )
  saver = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False, writer=True)
  saver.save(state.replace(opt_state=(optax.EmptyState(), adam_state)), 7)
  saver.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  reader = checkpoint_lib.Checkpointer(str(tmp_path))
  reader.check_compatible(abstract)
  restored = reader.restore(abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_the_exponential_schedule_decays_in_whole_steps_as_the_starter_code():
  # The starter code's rate: 0.95 ** floor(examples / 4M), here every decay_steps steps.
  config = default.get_config()
  config.optim.update(schedule="exponential", learning_rate=0.5, decay_rate=0.25, decay_steps=3)
  tx = train_lib.make_optimizer(config)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  # The same state as the constant schedule's: a run can resume with either.
  assert jax.tree.structure(state) == jax.tree.structure(_optimizer(0.0).init(params))
  grads = {"w": jnp.ones(2)}  # Constant: Adam's normalized step is 1 (to float32 rounding).
  updates = []
  for _ in range(8):
    update, state = tx.update(grads, state, params)
    updates.append(-float(update["w"][0]))
  expected = [0.5 * 0.25 ** (step // 3) for step in range(8)]  # 0.5, 0.5, 0.5, 0.125, ...
  np.testing.assert_allclose(updates, expected, rtol=1e-4)
  schedule = train_lib.learning_rate_schedule(config)  # What the train step logs.
  np.testing.assert_allclose([float(schedule(s)) for s in range(8)], expected, rtol=1e-7)
  # Exact where float32 cannot count steps: 2**24 + 1 rounds to 2**24 in float32.
  config.optim.update(decay_rate=0.5, decay_steps=2**24 + 1)
  late = train_lib.learning_rate_schedule(config)
  # As the train step calls it: the state's int32 step (optax's own float32 staircase gives 0.25).
  assert float(late(jnp.int32(2**24))) == 0.5 and float(late(jnp.int32(2**24 + 1))) == 0.25
