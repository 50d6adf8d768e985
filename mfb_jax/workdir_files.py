"""Small files in the workdir: config.json and hparams (users and scripts read them), the
writers that eval and predict use for theirs, and the lock that keeps a second training run out
of a workdir in use. A workdir may be local or any tf.io.gfile URL (gs://bucket/run)."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mfb_jax.errors import UserError, WorkdirError

CONFIG_FILE = "config.json"
LOCK_FILE = ".train.lock"
# How long a process looks for process 0's lock file in the workdir (a slow network file system
# may need more).
SHARED_WAIT_S = float(os.environ.get("MFB_JAX_SHARED_WORKDIR_WAIT_S", "10"))


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
    wanted = multihost_utils.broadcast_one_to_all(digest(written))
    sees = not wanted.any() or _read_within(self.path, wanted, SHARED_WAIT_S)
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
    if is_url(self.workdir):
      logging.warning("workdir %s is a URL: no training lock", self.workdir)
      return None
    try:
      self._made = []
      _make_dirs(self.workdir, self._made)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      return f"cannot use workdir {self.workdir}: {e.strerror}"
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: another process holds it.
      holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
      os.close(fd)
      self._made = []  # Folders this run made, but the other run now trains in: kept.
      return (
        f"workdir {self.workdir} is in use by another training run ({holder}); wait for it "
        "to finish, stop it, or use another --workdir"
      )
    except OSError as e:  # ENOLCK and the like: a file system without flock.
      os.close(fd)
      logging.warning("no training lock on %s (%s): start one run per workdir", self.path, e)
      return None
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    self._written = f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, self._written, 0)
      os.fsync(fd)  # Other hosts read it (_unshared) while this process keeps it open.
    except OSError as e:  # A full disk: the empty file the start-up probe made still fitted.
      os.close(fd)
      return _cannot_write(self.workdir, e, inference=False)
    self._fd = fd
    return None

  def __exit__(self, error_type=None, *_) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Drops the lock; the file stays (deleting it would race a newcomer).
      self._fd = None
    # A run refused at start-up (bad input) leaves no workdir it made: nothing in it is worth
    # keeping before the first checkpoint, and a new user would take it for a started run.
    refused = error_type is not None and issubclass(error_type, UserError)
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
    made.append(path)


def digest(text: bytes) -> np.ndarray:
  """8 bytes of text's SHA-256 as uint8, for comparing texts across processes (all zeros for no
  text)."""
  if not text:
    return np.zeros(8, np.uint8)
  return np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint8)


def _read_within(path: str, wanted: np.ndarray, seconds: float) -> bool:
  """Whether `path` holds the text whose digest is `wanted`, retried for `seconds` (a network
  file system may show another host's new file a moment late)."""
  deadline = time.monotonic() + seconds
  while True:
    try:
      with open(path, "rb") as f:
        if (digest(f.read(4096)) == wanted).all():
          return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.5)


def check_workdir(workdir: str, inference: bool) -> None:
  """Raises WorkdirError, before any work, for a workdir that cannot serve the run: a file, a URL
  of a scheme no file system serves, for eval and predict (inference=True) one that does not
  exist (it holds their checkpoint), and, if local and existing, one that takes no new file
  (results; for training also its checkpoints/ folder)."""
  if is_url(workdir):
    import tensorflow as tf  # Deferred: launch.py checks local workdirs before TF's start-up.

    try:
      exists = tf.io.gfile.exists(workdir)
      is_dir = exists and tf.io.gfile.isdir(workdir)
    except tf.errors.OpError as e:
      raise WorkdirError(f"cannot use workdir {workdir}: {' '.join(e.message.split())}") from e
  else:
    exists, is_dir = os.path.exists(workdir), os.path.isdir(workdir)
  if exists and not is_dir:
    raise WorkdirError(f"workdir {workdir} is a file, not a directory")
  if inference and not exists:
    raise WorkdirError(f"workdir {workdir} does not exist: train into it first (--mode=train)")
  if not exists or is_url(workdir):
    return
  folders = [workdir]
  if not inference and os.path.isdir(os.path.join(workdir, "checkpoints")):
    folders.append(os.path.join(workdir, "checkpoints"))
  for folder in folders:
    probe = os.path.join(folder, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise WorkdirError(_cannot_write(folder, e, inference)) from e


def _cannot_write(folder: str, error: OSError, inference: bool) -> str:
  """The line for a workdir (or its checkpoints/ folder) that takes no new file."""
  uses = "eval and predict write results there" if inference else "training saves there"
  return f"cannot write to {folder} ({error.strerror}): {uses}"


def is_url(path: str) -> bool:
  """A path with a scheme (gs://, s3://, ...): read and written through tf.io.gfile only."""
  return "://" in path


@contextlib.contextmanager
def atomic_file(path: str, before_rename=None):
  """A file opened for writing that appears at PATH whole or not at all: written to
  PATH.<pid>-<random>.tmp, then renamed (atomic on local file systems). On any failure (a full
  disk, a signal) PATH is as it was and no .tmp file is left. The name is the writer's own: an
  evaluation run beside training writes eval_results.json too, and with one shared PATH.tmp
  the two writes could mix, or the second rename find no file. before_rename: called once the
  file is written and closed (a full disk has failed by then), before it replaces PATH."""
  import tensorflow as tf  # Deferred, as in check_workdir.

  tf.io.gfile.makedirs(os.path.dirname(path) or ".")
  tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
  stage = "open"
  try:
    with tf.io.gfile.GFile(tmp, "w") as f:
      stage = "body"
      yield f
      stage = "close"
    stage = "before_rename"
    if before_rename is not None:
      before_rename()
    stage = "rename"
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException as e:
    with contextlib.suppress(Exception):
      tf.io.gfile.remove(tmp)
    # Writing, closing or renaming the file failed (not the caller's own code): name PATH.
    ours = stage in ("open", "close", "rename") or (stage == "body" and tmp in str(e))
    if isinstance(e, tf.errors.OpError | OSError) and ours:
      raise write_error(path, e) from e
    raise


@contextlib.contextmanager
def write_errors(path: str):
  """An OSError inside (a full disk, a read-only folder) as write_error's one line naming PATH."""
  try:
    yield
  except OSError as e:
    raise write_error(path, e) from e


def write_error(path: str, e: Exception) -> WorkdirError:
  reason = failure_reason(e) or str(e).split(";")[-1].strip()
  return WorkdirError(
    f"writing {path} failed ({reason}: a directory or a read-only file in its place, or a full "
    "disk?)"
  )


# The system's reasons a write fails, as TensorFlow's messages quote them.
_REASONS = [
  os.strerror(code)
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
]


# TensorFlow's errors for a file it could not write (others, an OOM's or a bad argument's, are
# not the file system's); a ResourceExhaustedError only with a reason above.
_IO_ERRORS = (
  "PermissionDeniedError",
  "NotFoundError",
  "FailedPreconditionError",
  "UnavailableError",
  "DataLossError",
  "AlreadyExistsError",
)


def failure_reason(error: BaseException | None) -> str | None:
  """The system's reason for a failed write ('No space left on device'), from the first OSError,
  TensorFlow file error or tensorstore error code in the error's chain of causes (`raise ...
  from`); None if none."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    message = getattr(error, "message", None)  # tf.errors.OpError: "PATH; REASON".
    if isinstance(message, str) and type(error).__module__.startswith("tensorflow"):
      known = [reason for reason in _REASONS if reason in message]
      if known:
        return known[0]
      if type(error).__name__ in _IO_ERRORS:
        # Eager ops wrap it as "{{function_node NAME}} PATH; REASON [Op:NAME] name:", and some
        # add lines after it.
        first = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:.*$", "", message.split("\n")[0])
        return first.split(";")[-1].strip()
      return None
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__  # Not __context__: an error met while handling another is not it.
  return None


def write_text(path: str, text: str) -> None:
  """Writes a small file whole (atomic_file)."""
  with atomic_file(path) as f:
    f.write(text)


def append_line(path: str, line: str) -> None:
  """Appends `line` and a newline to a small file, after a newline if the file's last line was
  cut short (a kill mid-write), so that line alone is lost. Object stores cannot append: there
  the file is read and rewritten."""
  if not is_url(path):  # No TensorFlow for a local file (the sweep's process has none).
    with write_errors(path), open(path, "ab+") as f:
      size = f.seek(0, os.SEEK_END)
      cut = size > 0 and os.pread(f.fileno(), 1, size - 1) != b"\n"
      f.write(("\n" if cut else "").encode() + line.encode() + b"\n")
    return
  import tensorflow as tf  # Deferred, as in check_workdir.

  old = tf.io.gfile.GFile(path).read() if tf.io.gfile.exists(path) else ""
  write_text(path, old + ("\n" if old and not old.endswith("\n") else "") + line + "\n")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config as WORKDIR/config.json (process 0, atomically)."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as flat {'a.b': scalar} pairs for TensorBoard's hparams plugin."""
  flat = {}

  def visit(prefix: str, node) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        visit(name + ".", value)
      elif isinstance(value, (bool, int, float, str)):
        flat[name] = value
      else:
        flat[name] = json.dumps(value, default=str)

  visit("", config)
  return flat
