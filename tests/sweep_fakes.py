"""Shared by the sweep's tests: a fake eval result, the sweep's flags on empty pattern files, and
a row of a markdown table."""

import types

from conftest import REPO

TINY = str(REPO / "configs" / "tiny.py")


def fake_result(step: int, gap: float, num_examples: int = 16) -> dict:
  return {"step": step, "num_examples": num_examples, "gap": gap, "map": gap / 2}


def table_row(markdown: str, first_cell: str) -> list[str]:
  for line in markdown.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == first_cell:
      return cells[1:]
  raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def sweep_flags(tmp_path, **kw):
  for name in ("train-0", "eval-0"):
    (tmp_path / name).touch()
  values = dict(
    workdir=str(tmp_path / "sweep"),
    config=TINY,
    aggregations=["avgpool"],
    fusions=["concat", "mfb"],
    steps=40,
    eval_every=None,
    train_pattern=str(tmp_path / "train-*"),
    eval_pattern=str(tmp_path / "eval-*"),
    set=["data.num_classes=32"],
    data_label="x",
    verbose=False,
  )
  values.update(kw)
  return types.SimpleNamespace(**values)
