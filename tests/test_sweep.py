"""The sweep tool: table formatting, overrides, resume rules, and a real two-cell sweep."""

import json
import os
import signal
import subprocess
import types

import matplotlib.image
import pytest
from conftest import PYTHON, REPO, run_python, write_synthetic

from mfb_jax import sweep, sweep_config, sweep_plots, sweep_report
from mfb_jax.errors import ConfigError

TINY = str(REPO / "configs" / "tiny.py")


def _result(step: int, gap: float, num_examples: int = 16) -> dict:
  return {"step": step, "num_examples": num_examples, "gap": gap, "map": gap / 2}


def _fake_row(agg, fusion, status, gap=None, step=100, error="", history=()) -> dict:
  result = None if gap is None else dict(_result(step, gap), hit_at_1=0.5, perr=0.25)
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


def _table_row(markdown: str, first_cell: str) -> list[str]:
  for line in markdown.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == first_cell:
      return cells[1:]
  raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def test_markdown_table_of_fake_results():
  rows = [
    _fake_row("avgpool", "concat", "done", gap=0.41234),
    _fake_row("avgpool", "mfb", "failed", error="error: boom in shard 3"),
    _fake_row("dbof", "concat", "partial", gap=0.12, step=50),
    _fake_row("dbof", "mfb", "done", gap=0.9),
  ]
  text = sweep_report.format_markdown(rows, META)
  header = _table_row(text, "aggregation")
  assert header == ["Concatenation", "MFB"]
  # Ours / paper, paper numbers typed from Tables 1 and 3; rows in the paper's order.
  assert _table_row(text, "Avgpooling") == ["41.23 / 74.2", "failed / 83.3"]
  assert _table_row(text, "DBoF") == ["12.00* / 84.0", "90.00 / 85.9"]
  assert text.index("| Avgpooling |") < text.index("| DBoF |")
  detail = _table_row(text, "Avgpooling + Concatenation")
  assert detail == ["41.23", "74.2", "-33.0", "20.62", "50.00", "25.00", "100", "8", "16"]
  assert _table_row(text, "DBoF + MFB")[:3] == ["90.00", "85.9", "+4.1"]
  assert "### Table 1: Avgpooling" in text and "### Table 3: DBoF" in text
  assert "- avgpool,mfb: error: boom in shard 3" in text
  assert "- DBoF: ours mfb > concat; paper mfb > concat" in text
  for fragment in ("fake data", "`t-*`", "`e-*`", "100 steps", "batch 8", META["command"]):
    assert fragment in text


def test_a_failed_cell_shows_no_earlier_result(tmp_path):
  # A rerun with a smaller --steps fails a cell already trained further ("already trained to step
  # 4 > --steps=2"): its row said failed while its table row and the ranking used step 4's GAP.
  (tmp_path / "eval_results.json").write_text(json.dumps(dict(_result(4, 0.5), hit_at_1=0.5)))
  failed = {"status": "failed", "error": "already trained to step 4 > --steps=2"}
  row = sweep_report._row("avgpool", "concat", str(tmp_path), 2, failed)
  assert (row["status"], row["result"]) == ("failed", None)
  text = sweep_report.format_markdown([row, _fake_row("avgpool", "mfb", "done", 0.3)], META)
  none = sweep_report._NO_VALUE
  assert _table_row(text, "Avgpooling + Concatenation")[:4] == ["failed", "74.2", none, none]
  assert "- Avgpooling: ours mfb; paper" in text
  assert sweep_report._row("avgpool", "concat", str(tmp_path), 4, None)["result"]["gap"] == 0.5


def test_a_config_files_own_error_is_one_line_naming_it(tmp_path):
  # It was a traceback and exit 1 (launch.py already gave one line).
  config = tmp_path / "mine.py"
  config.write_text("def get_config(arg=None):\n  return undefined_name\n")
  with pytest.raises(ConfigError) as error:
    sweep_config.load_config(str(config), "avgpool,concat")
  assert str(error.value) == f"--config={config}: NameError: name 'undefined_name' is not defined"


def test_history_last_line_wins_and_cut_lines_are_skipped(tmp_path):
  lines = [_result(2, 0.1), _result(4, 0.3), _result(2, 0.2)]
  with open(tmp_path / "eval_history.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines))
    f.write('{"step": 6, "gap"')  # Killed mid-write.
  history = sweep_report.read_history(str(tmp_path))
  assert [(h["step"], h["gap"]) for h in history] == [(2, 0.2), (4, 0.3)]
  assert sweep_report.read_history(str(tmp_path / "missing")) == []


def test_cell_state(tmp_path):
  assert sweep_report.cell_state(str(tmp_path), 4) == "todo"
  for step, expected in ((2, "todo"), (4, "done")):
    (tmp_path / "eval_results.json").write_text(json.dumps(_result(step, 0.5)))
    assert sweep_report.cell_state(str(tmp_path), 4) == expected
  (tmp_path / "eval_results.json").write_text(json.dumps(_result(6, 0.5)))
  assert "step 6 > --steps=4" in sweep_report.cell_state(str(tmp_path), 4)


def test_cells_trained_beyond_steps_stop_the_sweep_before_its_report(tmp_path):
  # A rerun with a smaller --steps failed every such cell and rewrote results.md all failed.
  cells = sweep_config.Sweep.from_flags(_flags(tmp_path), "cmd")  # --steps=40, two cells.
  for step, cell in [(40, "avgpool_concat"), (60, "avgpool_mfb")]:
    os.makedirs(tmp_path / "sweep" / cell)
    (tmp_path / "sweep" / cell / "eval_results.json").write_text(json.dumps(_result(step, 0.5)))
  with pytest.raises(ConfigError, match=r"avgpool_mfb is already trained to step 60 > --steps=40"):
    sweep.check_cells(cells)
  (tmp_path / "sweep" / "avgpool_mfb" / "eval_results.json").write_text(json.dumps(_result(8, 0.5)))
  sweep.check_cells(cells)  # Done and resumable cells pass.


def test_overrides_are_typed_and_checked():
  config = sweep_config.load_config(TINY, "avgpool,mfb")
  pairs = sweep_config.parse_sets(
    ["data.format=video", "config.data.num_classes=4716", "model.mfb.dropout=0.2"]
  )
  sweep_config.apply_overrides(config, pairs + [("data.random_frames", "true")])
  assert (config.data.format, config.data.num_classes) == ("video", 4716)
  assert config.model.mfb.dropout == 0.2 and config.data.random_frames is True
  assert (config.model.aggregator, config.model.fusion) == ("avgpool", "mfb")
  with pytest.raises(ConfigError, match="no field data.num_clases"):
    sweep_config.apply_overrides(config, [("data.num_clases", "3")])
  with pytest.raises(ConfigError, match="expected a int"):
    sweep_config.apply_overrides(config, [("train.batch_size", "big")])
  with pytest.raises(ConfigError, match="FIELD=VALUE"):
    sweep_config.parse_sets(["data.format"])


def _flags(tmp_path, **kw):
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


def test_launch_args_of_a_cell(tmp_path):
  sweep = sweep_config.Sweep.from_flags(_flags(tmp_path), "cmd")
  assert sweep.cells == [("avgpool", "concat"), ("avgpool", "mfb")]
  assert (sweep.steps, sweep.eval_every, sweep.batch_size, sweep.num_classes) == (40, 4, 8, 32)
  args = sweep.launch_args("avgpool", "mfb")
  assert args[1] == str(REPO / "launch.py")
  assert args[2:] == [
    f"--config={TINY}:avgpool,mfb",
    f"--workdir={tmp_path / 'sweep' / 'avgpool_mfb'}",
    "--config.data.num_classes=32",
    "--config.train.num_steps=40",
    "--config.train.eval_every=4",
    f"--config.data.train_pattern={tmp_path / 'train-*'}",
    f"--config.data.eval_pattern={tmp_path / 'eval-*'}",
  ]
  with pytest.raises(ConfigError, match="--steps"):
    sweep_config.Sweep.from_flags(_flags(tmp_path, set=["train.num_steps=5"]), "cmd")
  missing = r"no files match '/nonexistent/e-\*' \(/nonexistent does not exist\)$"
  with pytest.raises(ConfigError, match="^--eval_pattern: " + missing):
    sweep_config.Sweep.from_flags(_flags(tmp_path, eval_pattern="/nonexistent/e-*"), "cmd")
  # A pattern from the config is named as the config's: the sweep had blamed a flag not given.
  with pytest.raises(ConfigError, match="^the config's data.eval_pattern: " + missing):
    overrides = ["data.num_classes=32", "data.eval_pattern=/nonexistent/e-*"]
    flags = _flags(tmp_path, eval_pattern=None, set=overrides)
    sweep_config.Sweep.from_flags(flags, "cmd")
  with pytest.raises(ConfigError, match="no such config"):
    sweep_config.Sweep.from_flags(_flags(tmp_path, config="configs/nope.py"), "cmd")
  # What each cell's launch.py would refuse stops the sweep before it trains anything.
  bad_value = _flags(tmp_path, set=["train.batch_size=-4"])
  with pytest.raises(ConfigError, match=r"cell avgpool,concat: config.train.batch_size=-4"):
    sweep_config.Sweep.from_flags(bad_value, "cmd")
  with pytest.raises(ConfigError, match=r"cell avgpol,concat: config.model.aggregator='avgpol'"):
    sweep_config.Sweep.from_flags(_flags(tmp_path, aggregations=["avgpol"]), "cmd")
  with pytest.raises(ConfigError, match="takes no AGG,FUSION"):
    sweep_config.Sweep.from_flags(_flags(tmp_path, config="configs/default.py"), "cmd")
  assert not os.path.exists(tmp_path / "sweep")


def test_cells_of_earlier_sweeps_are_reported_whatever_their_names(tmp_path):
  # Beyond-the-paper cells (nextvlad, mfh) of an earlier sweep into the same directory vanished
  # from the report, which only looked for the paper's names.
  sweep = sweep_config.Sweep.from_flags(_flags(tmp_path), "cmd")  # avgpool,concat and mfb.
  for agg, fusion, gap in (("nextvlad", "mfb", 0.3), ("netvlad", "fc_concat", 0.4)):
    cell = tmp_path / "sweep" / f"{agg}_{fusion}"
    cell.mkdir(parents=True)
    config = {"model": {"aggregator": agg, "fusion": fusion}, "train": {"num_steps": 40}}
    (cell / "config.json").write_text(json.dumps(config))
    (cell / "eval_results.json").write_text(
      json.dumps(_result(40, gap) | {"hit_at_1": 0.5, "perr": 0.5})
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
  assert _table_row(markdown, "NeXtVLAD")[-1] == "30.00 / –"


def test_plots_of_fake_histories(tmp_path):
  history = [_result(s, g) for s, g in ((10, 0.2), (20, 0.5), (30, 0.6))]
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


def test_run_cell_streams_progress_and_keeps_the_error_line(tmp_path, capsys):
  code = (
    "import sys; print('I1125 14:30:00.123456 99 trainer.py:170] step 2/4 (50.0%) loss 1.0');"
    "print('chatter'); print('error: labels outside num_classes', file=sys.stderr); sys.exit(2)"
  )
  log = tmp_path / "logs" / "a_b.log"
  rc, error = sweep.run_cell([PYTHON, "-c", code], str(log), "[a,b]", False, sweep.StopFlag())
  assert (rc, error) == (2, "error: labels outside num_classes")
  shown = capsys.readouterr().out.splitlines()
  assert shown == ["  [a,b] step 2/4 (50.0%) loss 1.0", "  [a,b] error: labels outside num_classes"]
  assert "chatter" in log.read_text()  # Everything goes to the cell's log.


def test_stop_flag_forwards_sigterm_to_the_running_cell():
  stop = sweep.StopFlag()
  stop.child = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
  stop._handle(signal.SIGINT, None)
  assert stop.child.wait(timeout=30) == -signal.SIGTERM
  assert stop.signum == signal.SIGINT


# --- A real sweep: two tiny cells through launch.py.


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("sweep_data")
  write_synthetic(
    root,
    "--num_train=48",
    "--num_eval=16",
    "--num_shards=2",
    "--num_classes=64",
    "--min_frames=8",
    "--max_frames=16",
    "--seed=3",
  )
  return {"train": str(root / "train-*"), "eval": str(root / "eval-*")}


def _sweep(workdir, data, fusions: str):
  return run_python(
    [
      "-m",
      "mfb_jax.sweep",
      f"--workdir={workdir}",
      f"--config={TINY}",
      "--aggregations=avgpool",
      f"--fusions={fusions}",
      "--steps=4",
      "--eval_every=2",
      f"--train_pattern={data['train']}",
      f"--eval_pattern={data['eval']}",
      "--data_label=tiny synthetic",
    ],
    timeout=600,
  )


def _tree_stamps(path) -> dict:
  return {
    os.path.join(root, name): (os.stat(os.path.join(root, name)).st_mtime_ns,)
    for root, _, files in os.walk(path)
    for name in files
  }


@pytest.mark.slow
def test_sweep_runs_skips_and_reports(sweep_data, tmp_path):
  first = _sweep(tmp_path, sweep_data, "concat,mfb")
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "[1/2] avgpool,concat" in first.stdout and "[2/2] avgpool,mfb" in first.stdout
  assert "step 4/4" in first.stdout  # The child's progress lines are streamed.
  text = (tmp_path / "results.md").read_text()
  cells = _table_row(text, "Avgpooling")
  report = json.loads((tmp_path / "results.json").read_text())
  for i, (fusion, paper_gap) in enumerate((("concat", "74.2"), ("mfb", "83.3"))):
    with open(tmp_path / f"avgpool_{fusion}" / "eval_results.json") as f:
      result = json.load(f)
    assert result["step"] == 4 and result["num_examples"] == 16
    assert cells[i] == f"{100 * result['gap']:.2f} / {paper_gap}"
    assert report["cells"][i]["result"] == result
    assert [h["step"] for h in report["cells"][i]["history"]] == [2, 4]
  image = matplotlib.image.imread(tmp_path / "gap_curves_avgpool.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

  # Rerun with an extra cell that fails (its workdir is taken by a file): the finished cells are
  # skipped, untouched. (A bad config value would stop the sweep before any cell runs.)
  stamps = _tree_stamps(tmp_path / "avgpool_concat") | _tree_stamps(tmp_path / "avgpool_mfb")
  (tmp_path / "avgpool_audio").write_text("not a directory")
  second = _sweep(tmp_path, sweep_data, "audio,concat,mfb")
  assert second.returncode == 1, second.stdout[-3000:]
  assert "[1/3] avgpool,audio: FAILED" in second.stdout
  assert "not a directory" in second.stdout  # launch.py's one-line error, passed on.
  assert "[2/3] avgpool,concat: skipped" in second.stdout
  assert "[3/3] avgpool,mfb: skipped" in second.stdout
  assert stamps == _tree_stamps(tmp_path / "avgpool_concat") | _tree_stamps(
    tmp_path / "avgpool_mfb"
  )
  text = (tmp_path / "results.md").read_text()
  # The failed column (audio comes first in the paper's order), then the same numbers.
  assert _table_row(text, "Avgpooling") == ["failed / 38.1", *cells]
  assert "- avgpool,audio: error:" in text and "not a directory" in text
