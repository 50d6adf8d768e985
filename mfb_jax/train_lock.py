"""The training lock: WORKDIR/.train.lock, held by a training run's process 0 while it runs, so
that a second training run cannot save its checkpoints over the first one's."""

import errno
import fcntl
import os
import shutil
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax import cluster, signals, workdir_files
from mfb_jax.errors import Interrupted, UserError, WorkdirError

LOCK_FILE = ".train.lock"
_TRIES = 3  # To take the lock while a refused run removes the workdir it made.


class TrainingLock:
  """Held on WORKDIR/.train.lock by a training run's process 0 while it runs.

  A second training run on the same workdir would save its checkpoints over the first one's
  without a word; with the lock all its processes stop at once, process 0 with a one-line error
  naming the holder. The lock is an flock: the kernel drops it when its process ends, however
  it ends (kill -9 included), so a killed run never leaves a stale lock. Eval and predict take
  no lock (they may read a workdir while it trains). A URL workdir (gs://...), or a file system
  without flock, gets no lock (a warning says so). In a multi-process run every process must
  read the lock file in its own --workdir, or all stop: the workdir is not one shared folder.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None
    self._written = b""  # The lock file's text (process 0; none for a URL workdir).
    self._made: list[str] = []  # The folders this run made for the workdir (process 0).

  def __enter__(self) -> "TrainingLock":
    busy = self._take() if jax.process_index() == 0 else None
    if jax.process_count() > 1:  # Every process stops, not only the one that saw the holder.
      refused = multihost_utils.broadcast_one_to_all(np.int32(busy is not None))
      if busy is None and int(refused):
        busy = f"workdir {self.workdir} refused by process 0 (its error says why)"
      if busy is None:
        busy = self._unshared()
    if busy is not None:
      self.__exit__(WorkdirError)
      raise WorkdirError(busy)
    return self

  def _unshared(self) -> str | None:
    """The error line, on every process, unless every process reads the lock file process 0
    wrote: processes given different workdirs, or a local folder of the same name on each host,
    saved their checkpoints apart and hung in orbax's save for good."""
    written = self._written if jax.process_index() == 0 else b""
    wanted = multihost_utils.broadcast_one_to_all(workdir_files.digest(written))
    sees = not wanted.any() or _read_within(self.path, wanted, cluster.shared_workdir_wait_s())
    seen = multihost_utils.process_allgather(np.int32(sees))
    blind = [i for i, s in enumerate(np.ravel(seen)) if not s]
    if not blind:
      return None
    return (
      f"the workdir is not shared: process(es) {', '.join(map(str, blind))} of this run cannot "
      f"read the {LOCK_FILE} that process 0 wrote in its workdir (here --workdir={self.workdir}); "
      "every process needs the same --workdir, on storage all of them see (a network file "
      "system, or a bucket URL)"
    )

  def _take(self) -> str | None:
    """Takes the lock (or finds none is possible); else the error line (the workdir is held by
    another run, or cannot be made)."""
    if workdir_files.is_url(self.workdir):
      logging.warning("workdir %s is a URL: no training lock", self.workdir)
      return None
    self._made = []  # Over every try: a folder made on an earlier one is this run's too.
    for attempt in range(_TRIES):
      try:
        _make_dirs(self.workdir, self._made)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except FileNotFoundError as e:  # A refused run removing the workdir it made: again.
        if attempt + 1 < _TRIES:
          continue
        return f"cannot use workdir {self.workdir}: {e.strerror}"
      except OSError as e:
        return f"cannot use workdir {self.workdir}: {e.strerror}"
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:  # EWOULDBLOCK: another process holds it.
        if not _is_at(fd, self.path) and attempt + 1 < _TRIES:  # A refused run removing it.
          os.close(fd)
          continue
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
        os.close(fd)
        self._made = []  # Folders this run made, but the other run now trains in: kept.
        return (
          f"workdir {self.workdir} is in use by another training run ({holder}); wait for it "
          "to finish, stop it, or use another --workdir"
        )
      except OSError as e:  # ENOLCK and the like: a file system without flock.
        os.close(fd)
        if e.errno == errno.ESTALE and attempt + 1 < _TRIES:  # NFS: the file removed: again.
          continue
        logging.warning("no training lock on %s (%s): start one run per workdir", self.path, e)
        return None
      if _is_at(fd, self.path):
        break
      os.close(fd)  # A lock on a file that a refused run removed after it was opened: again.
    else:
      return f"cannot use workdir {self.workdir}: it was removed while this run took its lock"
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    self._written = f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, self._written, 0)
      os.fsync(fd)  # Other hosts read it (_unshared) while this process keeps it open.
    except OSError as e:  # A full disk: the empty file the start-up probe made still fitted.
      os.close(fd)
      return workdir_files.cannot_write(self.workdir, e, inference=False)
    self._fd = fd
    return None

  def __exit__(self, error_type=None, *_) -> None:
    try:
      self._remove_what_a_refused_run_made(error_type)
    finally:
      if self._fd is not None:
        # Drops the lock after any removal: a newcomer that opened the removed lock file and
        # gets its lock now takes the lock again on a new one (_is_at).
        os.close(self._fd)
        self._fd = None

  def _remove_what_a_refused_run_made(self, error_type) -> None:
    """A run refused at start-up (bad input), or stopped there by a signal, leaves no workdir it
    made: nothing in it is worth keeping before the first checkpoint, and a new user would take
    it for a started run. A newcomer that opened the lock file before it went takes its lock
    again (_is_at)."""
    refused = error_type is not None and (
      issubclass(error_type, UserError | Interrupted) or signals.stopped_by() is not None
    )
    made = list(self._made) if refused else []
    if made and made[-1] == self.workdir:
      if os.path.exists(os.path.join(self.workdir, "checkpoints")):
        made = []
      else:
        shutil.rmtree(made.pop(), ignore_errors=True)
    for parent in reversed(made):  # While empty: another run may have made its own workdir
      try:  # beside this one meanwhile.
        os.rmdir(parent)
      except OSError:
        break


def _is_at(fd: int, path: str) -> bool:
  """Whether the open file fd is still the one at `path` (not removed, nor replaced)."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except OSError:
    return False


def _make_dirs(path: str, made: list[str]) -> None:
  """os.makedirs(path, exist_ok=True) on the path as given (for 'x/../w' it makes x, through
  which the system goes), appending to `made` each folder that this call's own mkdir made,
  outermost first, as it goes (one that another process made meanwhile is not among them)."""
  head, tail = os.path.split(path)
  if not tail:  # A trailing slash.
    head, tail = os.path.split(head)
  if head and tail and not os.path.exists(head):
    _make_dirs(head, made)
  try:
    os.mkdir(path)
  except FileExistsError:
    if not os.path.isdir(path):  # A file, or a dangling symlink.
      raise
  else:
    if path not in made:  # Made again on a later try of TrainingLock._take.
      made.append(path)


def _read_within(path: str, wanted: np.ndarray, seconds: float) -> bool:
  """Whether `path` holds the text whose digest is `wanted`, retried for `seconds` (a network
  file system may show another host's new file a moment late)."""
  deadline = time.monotonic() + seconds
  while True:
    try:
      with open(path, "rb") as f:
        if (workdir_files.digest(f.read(4096)) == wanted).all():
          return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.5)
