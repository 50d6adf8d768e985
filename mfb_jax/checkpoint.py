"""Orbax checkpoints of the train state under WORKDIR/checkpoints/<step>.

Saves are atomic (orbax writes to a temporary directory and renames it on commit), so a process
killed mid-save leaves the previous checkpoints intact and no half-written step visible. Before
anything is restored, the checkpoint's array shapes are compared with the configured model, so a
workdir trained with another model fails with one line instead of a shape error deep in orbax.
"""

import contextlib
import os

import jax
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mfb_jax import workdir_files
from mfb_jax.errors import CheckpointError, lost_peer

# Restore errors that are not about the checkpoint's data (reported as errors, exit 1), besides a
# lost peer (errors.lost_peer).
_NOT_THE_CHECKPOINT = (
  "RESOURCE_EXHAUSTED",
  "Out of memory",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def _same_shapes(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(a[k][0] == b[k][0] for k in a)


def _brief(error: Exception) -> str:
  """An orbax/tensorstore error's first line without the store spec it quotes, after the
  system's reason where there is one (a long line is cut, and the reason may be at its end)."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  for tail in (" [tensorstore_spec=", " See full TensorStore details"):
    text = text.split(tail)[0]
  if "Unable to retrieve default item" in text:  # orbax's words for a step without its item.
    text = "its 'default' item is missing"
  text = text if len(text) <= 300 else text[:300] + "..."
  reason = workdir_files.failure_reason(error)
  return f"{reason}: {text}" if reason and reason not in text else text


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints: absolute if local (orbax needs that), a URL (gs://...) left as is."""
  directory = os.path.join(workdir, "checkpoints")
  return directory if workdir_files.is_url(directory) else os.path.abspath(directory)


def _say_cut_short_saves(directory: str) -> None:
  """Logs the saves that a stopped run left unfinished: orbax removes them without a word."""
  path = epath.Path(directory)
  if not path.is_dir():
    return
  names = sorted(p.name for p in path.iterdir() if ocp.utils.TMP_DIR_SUFFIX in p.name)
  if names:
    steps = ", ".join(name.split(".")[0] for name in names)
    logging.info(
      "removing %d unfinished save(s) left by a run stopped while saving (step %s: %s)",
      len(names),
      steps,
      ", ".join(os.path.join(directory, n) for n in names),
    )


def _shapes_the_model(field: str) -> bool:
  """Whether a config field can change the train state's arrays."""
  return field.startswith("model.") or field in (
    "data.num_classes",
    "data.rgb_size",
    "data.audio_size",
  )


# How many times a reader tries the latest step while a training run replaces it.
_READ_TRIES = 3


class Checkpointer:
  """Keeps the last N checkpoints of a workdir and restores the latest one."""

  def __init__(
    self, workdir: str, keep: int = 3, asynchronous: bool = True, writer: bool = False, config=None
  ):
    """writer: the training run (it holds the workdir's lock), which also removes the temporary
    directories of saves cut short (a kill, a full disk); eval and predict, which may read a
    workdir while it trains, leave them alone. The directory appears with the first save (orbax
    creates it): a run stopped by its start-up checks leaves no empty one behind. config: the
    run's, whose model settings that differ from the workdir's config.json a mismatch names."""
    self.directory = checkpoint_dir(workdir)
    self._workdir, self._config = workdir, config
    self._writer = writer
    if writer:
      _say_cut_short_saves(self.directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=False,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=writer,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def check_compatible(self, abstract_state, step: int | None = None) -> None:
    """Raises CheckpointError if the checkpoint's arrays differ from the configured state."""
    step = self.latest_step() if step is None else step
    if step is not None:
      self._layout(abstract_state, step)

  def _layout(self, abstract_state, step: int):
    """The tree to restore `step` into: the configured state's, or that of a state saved with
    gradient clipping before the clipping left Adam's state alone (a level of optax.chain, whose
    first state is empty); else a CheckpointError saying how the checkpoint differs."""
    try:
      stored = _shapes(self._manager.item_metadata(step))
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means an unusable workdir.
      raise self._damaged(step, _brief(e)) from e
    if not stored:  # orbax reads a checkpoint without its _METADATA file as an empty tree.
      raise self._damaged(step, "its metadata is missing")
    wanted = _shapes(abstract_state)
    if hasattr(abstract_state, "opt_state") and stored.keys() != wanted.keys():
      chained = abstract_state.replace(opt_state=(optax.EmptyState(), abstract_state.opt_state))
      if _same_shapes(stored, _shapes(chained)):
        return chained
    where = f"checkpoint {self.directory}/{step} does not match the config"
    # The parameters first: Adam's moments of a parameter would name the same change less plainly.
    for name in sorted(set(stored) | set(wanted), key=lambda n: (not n.startswith("params"), n)):
      if name not in stored:
        raise self._mismatch(
          f"{where}: it has no array {name} (was it trained with another model?)"
        )
      if name not in wanted:
        raise self._mismatch(f"{where}: it has an array {name} that the configured model lacks")
      if stored[name][0] != wanted[name][0]:
        raise self._mismatch(
          f"{where}: {name} has shape {stored[name][0]} in the checkpoint and "
          f"{wanted[name][0]} in the configured model"
        )
    return abstract_state

  def _mismatch(self, why: str) -> CheckpointError:
    """`why`, with the model settings changed since the workdir's config.json where known."""
    changed = []
    if self._config is not None:
      changed = workdir_files.changed_settings(self._workdir, self._config, _shapes_the_model)
    if not changed:
      return CheckpointError(why)
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return CheckpointError(f"{why}; changed since its config.json: {', '.join(changed[:3])}{more}")

  def restore(self, abstract_state, step: int | None = None):
    """The state at `step` (default: latest), placed with the abstract state's shardings.

    A one-process reader (eval, predict) beside a training run may see the latest step removed
    as it reads it (the run keeps only train.keep_checkpoints): it then reads the newest step
    instead, rather than calling a sound checkpoint damaged."""
    if step is not None or self._writer or jax.process_count() > 1:
      # Processes retrying on their own could restore different steps: there it stays an error.
      return self._restore(abstract_state, step)
    for _ in range(_READ_TRIES - 1):
      latest = self.latest_step()
      try:
        return self._restore(abstract_state, latest)
      except CheckpointError:
        if not self._replaced(latest):
          raise
        logging.warning("Checkpoint %s/%s was replaced while it was read", self.directory, latest)
    return self._restore(abstract_state, self.latest_step())

  def _replaced(self, step: int | None) -> bool:
    """Whether a training run has since removed `step` or saved a newer one."""
    self._manager.reload()
    steps = self.all_steps()
    return step is not None and (step not in steps or max(steps) > step)

  def _restore(self, abstract_state, step: int | None):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}: train first (--mode=train)")
    target = self._layout(abstract_state, step)
    logging.info("Restoring checkpoint %s/%d", self.directory, step)
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      return state if target is abstract_state else state.replace(opt_state=state.opt_state[1])
    except Exception as e:  # noqa: BLE001 - tensorstore's errors: ValueError, RuntimeError...
      if lost_peer(str(e)) or any(s in str(e) for s in _NOT_THE_CHECKPOINT):
        raise  # A lost peer, memory, a remote store's hiccup: the checkpoint may well be fine.
      raise self._damaged(step, _brief(e)) from e

  def _damaged(self, step: int, why: str) -> CheckpointError:
    """One line for a step that cannot be read, naming what to do: no earlier step is ever
    restored in its place without the user's word (that would silently drop training)."""
    return CheckpointError(
      f"cannot read checkpoint {self.directory}/{step} ({why}); it is damaged or was not "
      f"written by this project: {self.move_aside(step)}"
    )

  def move_aside(self, step: int) -> str:
    """What to do about a checkpoint that cannot be resumed from."""
    earlier = [s for s in self.all_steps() if s < step]
    then = f"resume from step {max(earlier)}" if earlier else "start again from step 0"
    return f"move {self.directory}/{step} out of {self.directory} to {then}"

  def save(self, state, step: int) -> bool:
    """Saves `state` as `step` unless that step is already saved; returns whether it saved."""
    if step in self._manager.all_steps():
      return False
    with self._save_errors():  # Also the previous, asynchronous save's.
      self._manager.save(step, args=ocp.args.StandardSave(state))
    return True

  def wait(self) -> None:
    with self._save_errors():
      self._manager.wait_until_finished()

  def close(self, quietly: bool = False) -> None:
    """Waits for the last save and stops orbax's threads. quietly: an error is already on its
    way out, and a failure here (orbax raises the failed save's error again) is only logged, so
    that it does not take that error's place."""
    try:
      with self._save_errors():
        try:
          self._manager.wait_until_finished()
        finally:
          self._manager.close()
    except CheckpointError as e:
      if not quietly:
        raise
      logging.error("%s", e)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, error_type, *_) -> None:
    self.close(quietly=error_type is not None)

  @contextlib.contextmanager
  def _save_errors(self):
    """A failed save (a full disk, a lost bucket) as one line; the saves before it are intact."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax raises ValueError, OSError, RuntimeError...
      earlier = "none was saved before it"
      with contextlib.suppress(Exception):
        self._manager.reload()  # From the disk: finished saves only.
        if self._manager.all_steps():
          earlier = "the checkpoints saved before it are intact"
      raise CheckpointError(
        f"saving a checkpoint in {self.directory} failed ({_brief(e)}); {earlier}"
      ) from e
