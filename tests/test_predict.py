"""--mode=predict's CSV, in-process on the tiny trained workdir: whole, or not there at all."""

import contextlib
import os
import re
import signal

import pytest

from mfb_jax import predict, workdir_files
from mfb_jax.errors import Interrupted, WorkdirError

HEADER = "VideoId,LabelConfidencePairs"


def _rows(workdir) -> list[str]:
  lines = (workdir / predict.PREDICTIONS_FILE).read_text().splitlines()
  assert lines[0] == HEADER
  return lines[1:]


def _leftovers(workdir) -> list[str]:
  names = (p.name for p in workdir.iterdir())
  return sorted(n for n in names if ".part-" in n or n.endswith((".tmp", ".old")))


def test_a_second_predict_run_during_one_leaves_both_csvs_whole(
  tiny_config, trained_workdir, monkeypatch
):
  # Both runs used to write WORKDIR/predictions.csv.part-00000: the second truncated the first's
  # part and removed it, and the first failed (exit 1) after a garbled merge.
  format_row, calls = predict._format_row, []

  def a_whole_second_run_after_the_first_row(*args):
    calls.append(args)
    if len(calls) == 2:  # The first run's part file exists (TensorFlow creates it at a write).
      predict.run_predict(tiny_config, str(trained_workdir))
      assert len(_rows(trained_workdir)) == 40
    return format_row(*args)

  monkeypatch.setattr(predict, "_format_row", a_whole_second_run_after_the_first_row)
  predict.run_predict(tiny_config, str(trained_workdir))
  rows = _rows(trained_workdir)
  assert len(rows) == 40 and len({row.split(",")[0] for row in rows}) == 40
  assert len(calls) == 80 and _leftovers(trained_workdir) == []  # Both runs wrote 40 rows.


def test_a_signal_while_merging_leaves_no_part_and_the_earlier_csv(
  tiny_config, trained_workdir, monkeypatch
):
  predict.run_predict(tiny_config, str(trained_workdir))
  earlier = (trained_workdir / predict.PREDICTIONS_FILE).read_text()

  def signalled(path, parts, named):
    assert all((trained_workdir / part).exists() for part in parts)
    raise Interrupted(signal.SIGTERM)

  monkeypatch.setattr(predict, "_merge_parts", signalled)
  with pytest.raises(Interrupted):
    predict.run_predict(tiny_config, str(trained_workdir))
  assert (trained_workdir / predict.PREDICTIONS_FILE).read_text() == earlier
  assert _leftovers(trained_workdir) == []


def test_a_new_csv_never_stands_beside_an_older_named_file(tiny_config, trained_workdir):
  # A predict killed between writing predictions.csv and predictions_named.csv used to leave the
  # previous run's named file beside the new CSV; one without predict.vocabulary did too.
  named = trained_workdir / predict.NAMED_PREDICTIONS_FILE
  named.write_text("VideoId,Labels\nold,music (0.900)\n")
  predict.run_predict(tiny_config, str(trained_workdir))
  assert len(_rows(trained_workdir)) == 40 and not named.exists()


def test_a_full_disk_is_one_line_naming_the_part_file(tiny_config, trained_workdir, monkeypatch):
  # It was exit 1: "ResourceExhaustedError: ...part-00000; No space left on device", as a bug.
  import tensorflow as tf

  class FullDisk:
    def __init__(self, f, **kwargs):
      self.name = f.name

    def writerow(self, row):
      raise tf.errors.ResourceExhaustedError(None, None, f"{self.name}; No space left on device")

  monkeypatch.setattr(predict.csv, "writer", FullDisk)
  with pytest.raises(WorkdirError) as raised:
    predict.run_predict(tiny_config, str(trained_workdir))
  assert re.fullmatch(
    rf"writing {trained_workdir}/predictions\.csv\.[0-9a-f]{{8}}\.part-00000 failed \(No space "
    r"left on device: a directory or a read-only file in its place, or a full disk\?\)",
    str(raised.value),
  )
  assert _leftovers(trained_workdir) == []


def test_a_full_disk_while_merging_keeps_both_earlier_files(
  tiny_config, trained_workdir, monkeypatch
):
  # The earlier predictions_named.csv was removed before the merge, which then failed: lost.
  import tensorflow as tf

  predict.run_predict(tiny_config, str(trained_workdir))
  named = trained_workdir / predict.NAMED_PREDICTIONS_FILE
  named.write_text("VideoId,Labels\nv,music (0.900)\n")
  earlier = (trained_workdir / predict.PREDICTIONS_FILE).read_text()
  real = workdir_files.atomic_file

  @contextlib.contextmanager
  def full_disk(path, **kwargs):
    with real(path, **kwargs) as f:

      class Full:
        def write(self, text):  # The header fits, the rows do not.
          if not text.startswith("VideoId,"):
            message = f"{f.name}; No space left on device"
            raise tf.errors.ResourceExhaustedError(None, None, message)
          f.write(text)

      yield Full()

  monkeypatch.setattr(predict.workdir_files, "atomic_file", full_disk)
  with pytest.raises(WorkdirError, match=r"predictions\.csv failed \(No space left on device"):
    predict.run_predict(tiny_config, str(trained_workdir))
  assert (trained_workdir / predict.PREDICTIONS_FILE).read_text() == earlier
  assert named.read_text() == "VideoId,Labels\nv,music (0.900)\n"
  assert _leftovers(trained_workdir) == []


def test_a_refused_rename_keeps_the_earlier_named_file(tiny_config, trained_workdir):
  # The named file was removed before predictions.csv was replaced, which then failed (here a
  # folder in its place; on gs:// a rename is a copy and a delete): lost.
  named = trained_workdir / predict.NAMED_PREDICTIONS_FILE
  named.write_text("VideoId,Labels\nv,music (0.900)\n")
  (trained_workdir / predict.PREDICTIONS_FILE).mkdir()
  with pytest.raises(WorkdirError, match=r"predictions\.csv failed"):
    predict.run_predict(tiny_config, str(trained_workdir))
  assert named.read_text() == "VideoId,Labels\nv,music (0.900)\n"
  assert _leftovers(trained_workdir) == []
  # A folder where the named file was: one line naming it (it was an error reported as a bug).
  (trained_workdir / predict.PREDICTIONS_FILE).rmdir()
  named.unlink()
  (named / "x").mkdir(parents=True)
  with pytest.raises(WorkdirError, match=r"predictions_named\.csv failed"):
    predict.run_predict(tiny_config, str(trained_workdir))


def test_a_signal_while_the_new_csv_replaces_the_old_is_held_to_the_end(
  tiny_config, trained_workdir, monkeypatch
):
  # Acted on at once, a SIGTERM right after the rename moved the old named file back beside the
  # new CSV, or left it as predictions_named.csv.<pid>.old.
  import tensorflow as tf

  named = trained_workdir / predict.NAMED_PREDICTIONS_FILE
  named.write_text("VideoId,Labels\nv,music (0.900)\n")
  rename = tf.io.gfile.rename

  def renamed_then_signalled(src, dst, overwrite=False):
    rename(src, dst, overwrite=overwrite)
    if dst.endswith(predict.PREDICTIONS_FILE):
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(tf.io.gfile, "rename", renamed_then_signalled)
  predict.run_predict(tiny_config, str(trained_workdir))
  assert len(_rows(trained_workdir)) == 40 and not named.exists()
  assert _leftovers(trained_workdir) == []
