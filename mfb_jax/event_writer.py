"""clu's metric writer (TensorBoard event files in the workdir, and log lines), whose failed
writes (a full disk, a lost bucket) are one line naming the workdir and the reason.

clu writes in a background thread and raises a failure at a later call, as an AsyncError whose
text advises programmers to create the writer differently; TensorFlow's own errors name its
internal ops. Either way the user could not tell that the disk was full.
"""

import contextlib

from clu import metric_writers

from mfb_jax import workdir_files
from mfb_jax.errors import WorkdirError


class EventWriter:
  """create_default_writer(workdir, just_logging)'s writes, flush and close; a write that fails
  raises WorkdirError. Other errors (a programming error's) pass through as they are."""

  def __init__(self, workdir: str, just_logging: bool):
    self._workdir = workdir
    with self._errors():
      self._writer = metric_writers.create_default_writer(workdir, just_logging=just_logging)

  def write_hparams(self, hparams: dict) -> None:
    with self._errors():
      self._writer.write_hparams(hparams)

  def write_scalars(self, step: int, scalars: dict) -> None:
    with self._errors():
      self._writer.write_scalars(step, scalars)

  def close(self) -> None:
    with self._errors():
      self._writer.flush()
      self._writer.close()

  @contextlib.contextmanager
  def _errors(self):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - clu's AsyncError wraps whatever the thread raised.
      reason = workdir_files.failure_reason(e)
      if reason is None:
        raise
      raise WorkdirError(f"writing TensorBoard events in {self._workdir} failed ({reason})") from e
