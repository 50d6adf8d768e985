"""The sweep's report: tables, rows of failed and earlier cells, histories, resume states, plots."""

import json
import os

import matplotlib.image
import pytest
from sweep_fakes import fake_result, sweep_flags, table_row

from mfb_jax import sweep_config, sweep_plots, sweep_report
from mfb_jax.errors import WorkdirError


def _fake_row(agg, fusion, status, gap=None, step=100, error="", history=()) -> dict:
  result = None if gap is None else dict(fake_result(step, gap), hit_at_1=0.5, perr=0.25)
  return {
    "aggregation": agg,
    "fusion": fusion,
    "status": status,
    "error": error,
    "result": result,
    "paper_gap": sweep_report.paper_gap(agg, fusion),
    "batch_size": 8,
    "history": list(history),
  }


META = {
  "date": "2025-01-01T00:00:00",
  "command": "python -m mfb_jax.sweep --workdir=X",
  "config_path": "configs/paper.py",
  "data_label": "fake data",
  "train_pattern": "t-*",
  "eval_pattern": "e-*",
  "steps": 100,
  "eval_every": 10,
  "batch_size": 8,
  "num_classes": 64,
  "data_format": "frame",
  "overrides": ["data.num_classes=64"],
}


def test_markdown_table_of_fake_results():
  rows = [
    _fake_row("avgpool", "concat", "done", gap=0.41234),
    _fake_row("avgpool", "mfb", "failed", error="error: boom in shard 3"),
    _fake_row("dbof", "concat", "partial", gap=0.12, step=50),
    _fake_row("dbof", "mfb", "done", gap=0.9),
  ]
  text = sweep_report.format_markdown(rows, META)
  header = table_row(text, "aggregation")
  assert header == ["Concatenation", "MFB"]
  # Ours / paper, paper numbers typed from Tables 1 and 3; rows in the paper's order.
  assert table_row(text, "Avgpooling") == ["41.23 / 74.2", "failed / 83.3"]
  assert table_row(text, "DBoF") == ["12.00* / 84.0", "90.00 / 85.9"]
  assert text.index("| Avgpooling |") < text.index("| DBoF |")
  detail = table_row(text, "Avgpooling + Concatenation")
  assert detail == ["41.23", "74.2", "-33.0", "20.62", "50.00", "25.00", "100", "8", "16"]
  assert table_row(text, "DBoF + MFB")[:3] == ["90.00", "85.9", "+4.1"]
  assert "### Table 1: Avgpooling" in text and "### Table 3: DBoF" in text
  assert "- avgpool,mfb: error: boom in shard 3" in text
  assert "- DBoF: ours mfb > concat; paper mfb > concat" in text
  for fragment in ("fake data", "`t-*`", "`e-*`", "100 steps", "batch 8", META["command"]):
    assert fragment in text


def test_a_failed_cell_shows_no_earlier_result(tmp_path):
  # A rerun with a smaller --steps fails a cell already trained further ("already trained to step
  # 4 > --steps=2"): its row said failed while its table row and the ranking used step 4's GAP.
  (tmp_path / "eval_results.json").write_text(json.dumps(dict(fake_result(4, 0.5), hit_at_1=0.5)))
  failed = {"status": "failed", "error": "already trained to step 4 > --steps=2"}
  row = sweep_report._row("avgpool", "concat", str(tmp_path), 2, failed)
  assert (row["status"], row["result"]) == ("failed", None)
  text = sweep_report.format_markdown([row, _fake_row("avgpool", "mfb", "done", 0.3)], META)
  none = sweep_report._NO_VALUE
  assert table_row(text, "Avgpooling + Concatenation")[:4] == ["failed", "74.2", none, none]
  assert "- Avgpooling: ours mfb; paper" in text
  assert sweep_report._row("avgpool", "concat", str(tmp_path), 4, None)["result"]["gap"] == 0.5


def test_history_last_line_wins_and_cut_lines_are_skipped(tmp_path):
  lines = [fake_result(2, 0.1), fake_result(4, 0.3), fake_result(2, 0.2)]
  with open(tmp_path / "eval_history.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines))
    f.write('{"step": 6, "gap"')  # Killed mid-write.
  history = sweep_report.read_history(str(tmp_path))
  assert [(h["step"], h["gap"]) for h in history] == [(2, 0.2), (4, 0.3)]
  assert sweep_report.read_history(str(tmp_path / "missing")) == []


def test_cell_state(tmp_path):
  assert sweep_report.cell_state(str(tmp_path), 4) == "todo"
  for step, expected in ((2, "todo"), (4, "done")):
    (tmp_path / "eval_results.json").write_text(json.dumps(fake_result(step, 0.5)))
    assert sweep_report.cell_state(str(tmp_path), 4) == expected
  (tmp_path / "eval_results.json").write_text(json.dumps(fake_result(6, 0.5)))
  assert "step 6 > --steps=4" in sweep_report.cell_state(str(tmp_path), 4)


def test_cells_of_earlier_sweeps_are_reported_whatever_their_names(tmp_path):
  # Beyond-the-paper cells (nextvlad, mfh) of an earlier sweep into the same directory vanished
  # from the report, which only looked for the paper's names.
  sweep = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")  # avgpool,concat and mfb.
  for agg, fusion, gap in (("nextvlad", "mfb", 0.3), ("netvlad", "fc_concat", 0.4)):
    cell = tmp_path / "sweep" / f"{agg}_{fusion}"
    cell.mkdir(parents=True)
    config = {"model": {"aggregator": agg, "fusion": fusion}, "train": {"num_steps": 40}}
    (cell / "config.json").write_text(json.dumps(config))
    (cell / "eval_results.json").write_text(
      json.dumps(fake_result(40, gap) | {"hit_at_1": 0.5, "perr": 0.5})
    )
  unevaluated = tmp_path / "sweep" / "dbof_mfh"  # Never evaluated: not a row yet.
  unevaluated.mkdir()
  (unevaluated / "config.json").write_text(json.dumps({"model": {"aggregator": "dbof"}}))
  rows = sweep_report.collect(sweep, {})
  cells = [(r["aggregation"], r["fusion"]) for r in rows]
  assert cells == [
    ("avgpool", "concat"),
    ("avgpool", "mfb"),
    ("netvlad", "fc_concat"),  # The paper's cells first, in table order.
    ("nextvlad", "mfb"),
  ]
  assert [r["result"]["gap"] for r in rows[2:]] == [0.4, 0.3]
  markdown = sweep_report.format_markdown(rows, META, [])
  assert table_row(markdown, "NeXtVLAD")[-1] == "30.00 / –"


def test_plots_of_fake_histories(tmp_path):
  history = [fake_result(s, g) for s, g in ((10, 0.2), (20, 0.5), (30, 0.6))]
  rows = [
    _fake_row("avgpool", "concat", "done", 0.6, history=history),
    _fake_row("avgpool", "mfb", "done", 0.7, history=history[:2]),
    _fake_row("dbof", "mfb", "done", 0.8, history=history),
    _fake_row("netvlad", "mfb", "failed"),  # No history: no figure.
  ]
  paths = sweep_plots.plot_curves(rows, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["gap_curves.png", "gap_curves_avgpool.png", "gap_curves_dbof.png"]
  single = matplotlib.image.imread(tmp_path / "gap_curves_avgpool.png")
  both = matplotlib.image.imread(tmp_path / "gap_curves.png")
  assert single.ndim == 3 and single.shape[2] in (3, 4) and single.shape[0] > 100
  assert both.shape[1] > single.shape[1]  # Two panels side by side.


def test_a_cut_run_line_is_skipped_and_a_report_that_cannot_be_written_is_one_line(tmp_path):
  # A full disk cut sweep_runs.jsonl's last line short: every later sweep in that directory
  # then ended with a JSONDecodeError traceback, even after space was freed.
  sweep = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "python -m mfb_jax.sweep ...")
  runs = tmp_path / "sweep" / sweep_config.RUNS_FILE
  runs.parent.mkdir()
  runs.write_text('{"date": "2026-12-01", "command": "first", "cells": []}\n{"date": "2026-1')
  sweep.record_run()
  assert runs.read_text().splitlines()[1:] == [
    '{"date": "2026-1',
    json.dumps({"date": sweep.date, "command": sweep.command, "cells": sweep_cells(sweep)}),
  ]
  assert [run["command"] for run in sweep_report._runs(sweep.workdir)] == ["first", sweep.command]
  sweep_report.write_report(sweep, {})
  (tmp_path / "sweep" / "results.json").unlink()
  (tmp_path / "sweep" / "results.json").mkdir()  # Cannot be replaced: as a full disk, one line.
  with pytest.raises(WorkdirError, match=rf"^writing {tmp_path}/sweep/results.json failed \("):
    sweep_report.write_report(sweep, {})
  assert sorted(os.listdir(tmp_path / "sweep")) == [
    "results.json",
    "results.md",
    "sweep_runs.jsonl",
  ]


def sweep_cells(sweep) -> list[str]:
  return [f"{agg},{fusion}" for agg, fusion in sweep.cells]
