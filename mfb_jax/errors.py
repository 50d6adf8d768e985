"""User-facing errors: bad input that launch.py reports as one line and a non-zero exit."""

import contextlib


class UserError(Exception):
  """Bad input or configuration; the message is shown to the user as one line."""


class DataError(UserError):
  """Missing, empty, corrupt or malformed data files."""


class UnlabelledError(DataError):
  """Videos to evaluate, none of them with a label (test shards, or labels under another key)."""


class ConfigError(UserError, ValueError):
  """An invalid config value; the message names the field and the allowed values."""


class CheckpointError(UserError):
  """A workdir checkpoint that cannot be used with this config."""


class WorkdirError(UserError):
  """A workdir that cannot be used: not writable, or held by another training run."""


class ResourceError(UserError):
  """A config whose step needs more memory than its devices have (mfb_jax/memory.py)."""


class TrainingError(UserError):
  """Training cannot go on (e.g. a NaN loss); no broken state was saved."""


class Interrupted(BaseException):
  """SIGTERM or SIGINT outside the training loop (mfb_jax/signals.py); a BaseException, like
  KeyboardInterrupt, so that no `except Exception` on the way up swallows it."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def about(source: str):
  """DataErrors raised within start with `source: `, the config field or flag that named the
  files (`data.eval_pattern: no file matches ...`)."""
  try:
    yield
  except DataError as e:
    raise type(e)(f"{source}: {e}") from e


def lost_peer(text: str) -> bool:
  """Whether an error's text says a connection to another process of the run was lost (a
  collective's or the distributed runtime's: that process's own error says why)."""
  return "Connection closed by peer" in text or "Connection reset by peer" in text


def agreed(check):
  """check()'s result where it succeeds on every process; else a UserError on every process: its
  own where it failed, one naming the first failing process elsewhere. Checks that read
  process-local things (this process's files, its view of the workdir) go through here, so that
  no process waits in a collective for a process that has already stopped."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  error, result = None, None
  try:
    result = check()
  except UserError as e:
    error = e
  if jax.process_count() > 1:
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.any():
      first = int(np.flatnonzero(failed)[0])
      raise UserError(f"process {first} stopped the run (its own error line says why)")
  if error is not None:
    raise error
  return result
