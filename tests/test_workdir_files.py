"""The workdir lock: one training run per workdir, never a stale lock after a kill."""

import subprocess
import sys
import time

import pytest

from mfb_jax import workdir_files
from mfb_jax.errors import WorkdirError

HOLD = """
import sys, time
from mfb_jax import workdir_files
with workdir_files.TrainingLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def test_lock_refuses_a_second_holder_and_is_free_after_release(tmp_path):
  with workdir_files.TrainingLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=r"is in use by another training run \(pid \d+ on "):
      workdir_files.TrainingLock(str(tmp_path)).__enter__()
  with workdir_files.TrainingLock(str(tmp_path)) as lock:  # Released: taken again.
    assert lock.path == str(tmp_path / workdir_files.LOCK_FILE)


def test_lock_of_a_killed_process_is_free(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=f"pid {holder.pid} "):
      workdir_files.TrainingLock(str(tmp_path)).__enter__()
  finally:
    holder.kill()
    holder.wait()
  deadline = time.time() + 10
  with workdir_files.TrainingLock(str(tmp_path)):  # kill -9 left no stale lock behind.
    assert time.time() < deadline


def test_unusable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(WorkdirError, match="cannot use workdir .*file/sub: Not a directory"):
    workdir_files.TrainingLock(str(tmp_path / "file" / "sub")).__enter__()
