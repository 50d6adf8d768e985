"""Small files in the workdir: config.json and hparams (users and scripts read them), and the
writers that eval and predict use for theirs (train_lock.py keeps a second training run out of
a workdir in use). A workdir may be local or any tf.io.gfile URL (gs://bucket/run)."""

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket

import jax
import ml_collections
import numpy as np

from mfb_jax.errors import WorkdirError

CONFIG_FILE = "config.json"
# The files each mode writes at the workdir's top level (evaluate.RESULTS_FILE, HISTORY_FILE,
# predict.PREDICTIONS_FILE, NAMED_PREDICTIONS_FILE): check_workdir refuses a folder at any.
_RESULTS = ("eval_results.json", "eval_history.jsonl")
WRITTEN_BY_MODE = {
  "train": (CONFIG_FILE, *_RESULTS),
  "eval": _RESULTS,
  "predict": ("predictions.csv", "predictions_named.csv"),
  "bench": (),
}


def digest(text: bytes) -> np.ndarray:
  """8 bytes of text's SHA-256 as uint8, for comparing texts across processes (all zeros for no
  text)."""
  if not text:
    return np.zeros(8, np.uint8)
  return np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint8)


def check_workdir(workdir: str, inference: bool, writes: tuple[str, ...] = ()) -> None:
  """Raises WorkdirError, before any work, for a workdir that cannot serve the run: a file, a URL
  of a scheme no file system serves, for eval and predict (inference=True) one that does not
  exist (it holds their checkpoint), and, if local and existing, one that takes no new file
  (results; for training also its checkpoints/ folder) or holds a folder where the run writes
  one of the files `writes` names (WRITTEN_BY_MODE)."""
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
  for name in writes:  # Found only when writing it: for predict, after the whole pass.
    if os.path.isdir(os.path.join(workdir, name)):
      raise WorkdirError(
        f"cannot use workdir {workdir}: its {name} is a folder, where this run writes that "
        "file; move it away"
      )
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
      raise WorkdirError(cannot_write(folder, e, inference)) from e


def cannot_write(folder: str, error: OSError, inference: bool) -> str:
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


# Settings that may change between the runs of one workdir without changing what it trains: how
# often it logs, saves and evaluates, how many steps, how its input is buffered, what predict
# would read. (The sweep refuses a cell's other changes.)
MAY_DIFFER = (
  "train.num_steps",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.log_every",
  "eval.batch_size",
  "data.prefetch_batches",
  "data.predict_pattern",
)


def changed_settings(workdir: str, config: ml_collections.ConfigDict, fields=None) -> list[str]:
  """'field before -> now' for each setting of differing_settings between `config` and the
  workdir's config.json (its last training run's); [] where there is none, or it cannot be
  read."""
  import tensorflow as tf  # Deferred, as in check_workdir.

  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with tf.io.gfile.GFile(path) as f:
      before = json.loads(f.read())
  except (tf.errors.OpError, ValueError):
    return []
  if not isinstance(before, dict):  # Not a config.json of this project's.
    return []
  return [f"{n} {was!r} -> {now!r}" for n, was, now in differing_settings(before, config, fields)]


def inference_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """changed_settings for eval and predict: the model's and the inputs' settings (a model
  trained on 16 frames and evaluated on 300 was not told); the files read and how they are
  buffered may differ."""
  kept = ("data.train_pattern", "data.eval_pattern", "data.shuffle_buffer", "data.random_frames")
  fields = lambda name: name.startswith(("model.", "data.")) and name not in kept + MAY_DIFFER
  return changed_settings(workdir, config, fields)


def differing_settings(before: dict, config: ml_collections.ConfigDict, fields=None) -> list:
  """(field, before, now) for each setting (of `fields`, a predicate; default: not MAY_DIFFER)
  that differs between a config.json's JSON (`before`) and `config`, in the fields' order. A
  field that an older config.json lacks (config_fields.OPTIONAL) had its configs/default.py
  value: `model.normalize_frames` turned on for eval of a run from before it is named too."""
  from mfb_jax import config_fields  # Deferred: it imports configs/.

  before, now = flat_hparams(before), flat_hparams(json.loads(config.to_json_best_effort()))
  before = {**config_fields.optional_defaults(), **before}
  fields = fields or (lambda name: name not in MAY_DIFFER)
  return [
    (name, before[name], now[name])
    for name in sorted(set(before) & set(now))
    if before[name] != now[name] and fields(name)
  ]


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
