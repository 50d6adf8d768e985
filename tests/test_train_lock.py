"""The training lock: one training run per workdir, never stale after a kill, and a refused run
leaves no folder it made."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from mfb_jax import checkpoint, train_lock, workdir_files
from mfb_jax.errors import WorkdirError

HOLD = """
import sys, time
from mfb_jax import train_lock
with train_lock.TrainingLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def test_lock_refuses_a_second_holder_and_is_free_after_release(tmp_path):
  with train_lock.TrainingLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=r"is in use by another training run \(pid \d+ on "):
      train_lock.TrainingLock(str(tmp_path)).__enter__()
  with train_lock.TrainingLock(str(tmp_path)) as lock:  # Released: taken again.
    assert lock.path == str(tmp_path / train_lock.LOCK_FILE)


def test_lock_of_a_killed_process_is_free(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=f"pid {holder.pid} "):
      train_lock.TrainingLock(str(tmp_path)).__enter__()
  finally:
    holder.kill()
    holder.wait()
  with train_lock.TrainingLock(str(tmp_path)) as lock:  # kill -9 left no stale lock behind.
    assert open(lock.path).read().startswith(f"pid {os.getpid()} on ")


def test_every_process_must_see_process_0s_lock_file(tmp_path, monkeypatch):
  """Process 1 of 2, given process 0's workdir or another one (a local folder per host)."""
  shared, own = tmp_path / "shared", tmp_path / "own"
  with train_lock.TrainingLock(str(shared)) as process_0:  # Takes the lock, writes the file.
    written = (shared / train_lock.LOCK_FILE).read_bytes()
    monkeypatch.setattr(train_lock.jax, "process_index", lambda: 1)
    monkeypatch.setattr(train_lock.jax, "process_count", lambda: 2)
    monkeypatch.setenv("MFB_JAX_SHARED_WORKDIR_WAIT_S", "0")
    # Process 0's side of the collectives: not refused, then its lock file's digest.
    sent = [np.int32(0), workdir_files.digest(written)]
    utils = train_lock.multihost_utils
    monkeypatch.setattr(utils, "broadcast_one_to_all", lambda x: sent[0 if x.ndim == 0 else 1])
    monkeypatch.setattr(utils, "process_allgather", lambda sees: np.array([1, int(sees)]))
    with train_lock.TrainingLock(str(shared)) as process_1:
      assert process_1._fd is None  # Only process 0 holds the lock.
    with pytest.raises(WorkdirError) as error:
      train_lock.TrainingLock(str(own)).__enter__()
    assert str(error.value) == (
      f"the workdir is not shared: process(es) 1 of this run cannot read the .train.lock that "
      f"process 0 wrote in its workdir (here --workdir={own}); every process needs the same "
      "--workdir, on storage all of them see (a network file system, or a bucket URL)"
    )
    assert process_0._fd is not None


def test_a_file_system_without_flock_trains_unlocked(tmp_path, monkeypatch):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with train_lock.TrainingLock(str(tmp_path)):  # A warning, not "in use by another run".
    with train_lock.TrainingLock(str(tmp_path)):
      pass


def test_unusable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(WorkdirError, match="cannot use workdir .*file/sub: Not a directory"):
    train_lock.TrainingLock(str(tmp_path / "file" / "sub")).__enter__()


def test_url_workdir_takes_no_lock_and_keeps_its_checkpoint_url(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with train_lock.TrainingLock("ram://run-b"):  # No flock on an object store.
    assert not tf.io.gfile.exists(f"ram://run-b/{train_lock.LOCK_FILE}")
  assert checkpoint.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
  assert checkpoint.checkpoint_dir("run") == str(tmp_path / "run" / "checkpoints")
  assert list(tmp_path.iterdir()) == []


def test_a_refused_run_leaves_no_workdir_it_made(tmp_path):
  # A refusal after the lock (bad data found at start-up) left a new workdir holding .train.lock,
  # config.json and an events file: a new user took it for a started run.
  from mfb_jax.errors import DataError, Interrupted, WorkdirError

  fresh = tmp_path / "fresh"
  with pytest.raises(DataError), train_lock.TrainingLock(str(fresh)):
    (fresh / "config.json").write_text("{}")
    raise DataError("none of the 16 training videos has a label")
  assert not fresh.exists()
  # SIGTERM or Ctrl-C at start-up (before the first step): a folder holding .train.lock stayed.
  with pytest.raises(Interrupted), train_lock.TrainingLock(str(fresh)):
    raise Interrupted(signal.SIGTERM)
  assert not fresh.exists()
  wrapped = mock.patch.object(train_lock.signals, "stopped_by", lambda: Interrupted(15))
  with wrapped, pytest.raises(RuntimeError), train_lock.TrainingLock(str(fresh)):
    raise RuntimeError("stopped")  # A library's error, raised for the signal.
  assert not fresh.exists()
  # Kept: a workdir that was there before, one with checkpoints, one a bug stopped (its logs).
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(DataError), train_lock.TrainingLock(str(existing)):
    raise DataError("bad data")
  assert os.listdir(existing) == [".train.lock"]
  with pytest.raises(DataError), train_lock.TrainingLock(str(fresh)):
    (fresh / "checkpoints").mkdir()
    raise DataError("bad data")
  assert sorted(os.listdir(fresh)) == [".train.lock", "checkpoints"]
  with pytest.raises(RuntimeError), train_lock.TrainingLock(str(tmp_path / "bug")):
    raise RuntimeError("a bug")
  assert (tmp_path / "bug").exists()
  # The parents it made go too ('--workdir=~/runs/a' left a folder '~' behind), but not one
  # where another run made its own workdir meanwhile.
  with pytest.raises(DataError), train_lock.TrainingLock(str(tmp_path / "new/runs/a")):
    raise DataError("bad data")
  assert not (tmp_path / "new").exists()
  with pytest.raises(DataError), train_lock.TrainingLock(str(tmp_path / "new/runs/a")):
    (tmp_path / "new/runs/b").mkdir()
    raise DataError("bad data")
  assert os.listdir(tmp_path / "new/runs") == ["b"]
  # The path as given: 'x/../w' goes through x, which must be made (and then removed) too.
  with pytest.raises(DataError), train_lock.TrainingLock(str(tmp_path / "x/../w")):
    assert (tmp_path / "w" / ".train.lock").exists()
    raise DataError("bad data")
  assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()
  # A folder that cannot be made: the ones made before it go.
  with pytest.raises(WorkdirError, match="File name too long"):
    with train_lock.TrainingLock(str(tmp_path / "deep" / ("x" * 300))):
      pass
  assert not (tmp_path / "deep").exists()


def test_a_run_refused_for_a_busy_workdir_removes_nothing(tmp_path, monkeypatch):
  """Two runs started at once on a new workdir: the one that made it can lose the lock to the
  other, and its refusal removed the workdir (and the lock file) that the other trained in."""
  import fcntl

  from mfb_jax.errors import WorkdirError

  workdir, held, real_open = tmp_path / "new" / "w", [], os.open

  def the_other_run_locks_first(path, flags, *args):
    held.append(real_open(path, flags, *args))
    fcntl.flock(held[0], fcntl.LOCK_EX)
    monkeypatch.setattr(os, "open", real_open)
    return real_open(path, flags, *args)

  monkeypatch.setattr(os, "open", the_other_run_locks_first)
  with pytest.raises(WorkdirError, match="is in use by another training run"):
    with train_lock.TrainingLock(str(workdir)):
      pass
  assert os.listdir(workdir) == [".train.lock"]
  os.close(held[0])


def test_a_run_that_opened_the_lock_file_a_refused_run_then_removed_takes_it_anew(
  tmp_path, monkeypatch
):
  """Two runs started at once on a new workdir: the first, refused (bad data), removes the
  workdir it made, lock file included, while the second has opened that file and waits for its
  lock. The second then held a lock on a removed file, in a workdir removed under it."""
  from mfb_jax.errors import DataError

  workdir, real_flock, removed = tmp_path / "new", fcntl.flock, []

  def a_refused_run_removes_the_workdir_first(fd, operation):
    if not removed:  # Once: between this run's open and its flock.
      removed.append(False)
      with pytest.raises(DataError), train_lock.TrainingLock(str(workdir)):
        raise DataError("bad data")
      removed[0] = not workdir.exists()
    return real_flock(fd, operation)

  real_make_dirs = train_lock._make_dirs

  def each_run_made_it(path, made):  # As if the refused run had made the workdir, not found it.
    real_make_dirs(path, made)
    made[:] = made or [path]

  monkeypatch.setattr(train_lock, "_make_dirs", each_run_made_it)
  monkeypatch.setattr(fcntl, "flock", a_refused_run_removes_the_workdir_first)
  with train_lock.TrainingLock(str(workdir)) as lock:
    assert removed == [True]
    assert os.path.samestat(os.fstat(lock._fd), os.stat(lock.path))


def test_a_run_refused_while_a_refused_run_removes_the_workdir_retries(tmp_path, monkeypatch):
  """As above, but the refused run still holds the removed file's lock when this run asks."""
  workdir, real_flock, holders = tmp_path / "w", fcntl.flock, []

  def held_by_a_run_removing_it(fd, operation):
    if not holders:  # Once: the other run holds the file's lock, and has removed the file.
      holders.append(os.open(workdir / train_lock.LOCK_FILE, os.O_RDWR))
      real_flock(holders[0], fcntl.LOCK_EX)
      os.remove(workdir / train_lock.LOCK_FILE)
    return real_flock(fd, operation)

  monkeypatch.setattr(fcntl, "flock", held_by_a_run_removing_it)
  with train_lock.TrainingLock(str(workdir)) as lock:
    assert os.path.samestat(os.fstat(lock._fd), os.stat(lock.path))
  os.close(holders[0])
