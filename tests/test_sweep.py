"""The sweep tool: flags and overrides, refusals before training, cells run as launch.py, and a
real two-cell sweep (its report's parts: test_sweep_report.py; its cells' processes, signals and
write failures: test_sweep_cells.py)."""

import json
import os

import matplotlib.image
import pytest
from conftest import REPO, last_line, run_python, write_synthetic
from sweep_fakes import TINY, fake_result, sweep_flags, table_row

from mfb_jax import sweep, sweep_config
from mfb_jax.errors import ConfigError, WorkdirError


def test_a_config_files_own_error_is_one_line_naming_it(tmp_path):
  # It was a traceback and exit 1 (launch.py already gave one line).
  config = tmp_path / "mine.py"
  config.write_text("def get_config(arg=None):\n  return undefined_name\n")
  with pytest.raises(ConfigError) as error:
    sweep_config.load_config(str(config), "avgpool,concat")
  assert str(error.value) == f"--config={config}: NameError: name 'undefined_name' is not defined"


def test_cells_trained_beyond_steps_stop_the_sweep_before_its_report(tmp_path):
  # A rerun with a smaller --steps failed every such cell and rewrote results.md all failed.
  cells = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")  # --steps=40, two cells.
  for step, cell in [(40, "avgpool_concat"), (60, "avgpool_mfb")]:
    os.makedirs(tmp_path / "sweep" / cell)
    (tmp_path / "sweep" / cell / "eval_results.json").write_text(json.dumps(fake_result(step, 0.5)))
  with pytest.raises(ConfigError, match=r"avgpool_mfb is already trained to step 60 > --steps=40"):
    sweep.check_cells(cells)
  (tmp_path / "sweep" / "avgpool_mfb" / "eval_results.json").write_text(
    json.dumps(fake_result(8, 0.5))
  )
  sweep.check_cells(cells)  # Done and resumable cells pass.


def test_a_second_sweep_in_the_same_workdir_is_refused(tmp_path):
  # The second one trained the same cells beside the first; the cells it was refused were
  # reported as failed in the shared results.md, and it exited 1.
  first = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")
  first.hold_lock()
  try:
    second = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")
    with pytest.raises(WorkdirError) as error:
      second.hold_lock()
    assert str(error.value).startswith(
      f"sweep {tmp_path}/sweep is in use by another sweep (pid {os.getpid()}, since "
    )
  finally:
    os.close(sweep_config._HELD.pop())  # As the first sweep's exit would.
  second.hold_lock()  # Free again.
  os.close(sweep_config._HELD.pop())
  # A file given as --workdir read "writing F/sweep_runs.jsonl failed (File exists ...); rerun
  # the same command to resume".
  (tmp_path / "file").write_text("")
  with pytest.raises(WorkdirError, match=r"^--workdir=.*/file is a file, not a folder$"):
    sweep_config.Sweep.from_flags(
      sweep_flags(tmp_path, workdir=str(tmp_path / "file")), ""
    ).hold_lock()


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
  # Read as the cell's launch.py reads it: a rerun compared '~/e-*' with its cells' '/home/me/e-*'.
  home = sweep_config.parse_sets(["data.eval_pattern=~/e-*", "predict.vocabulary=a/~/v"])
  assert home == [
    ("data.eval_pattern", os.path.expanduser("~/e-*")),
    ("predict.vocabulary", "a/~/v"),
  ]


def test_launch_args_of_a_cell(tmp_path):
  sweep = sweep_config.Sweep.from_flags(sweep_flags(tmp_path), "cmd")
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
  # Globs that Python's glob cannot read but the runs' (TensorFlow's) can are not refused.
  classes = sweep_flags(tmp_path, train_pattern=str(tmp_path / "train-[[:digit:]]"))
  assert sweep_config.Sweep.from_flags(classes, "cmd").train_pattern.endswith("[[:digit:]]")
  with pytest.raises(ConfigError, match="--steps"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, set=["train.num_steps=5"]), "cmd")
  # A fusion for every cell trained concat in the 'avgpool,mfb' row of results.md.
  with pytest.raises(ConfigError, match=r"^--set=model.fusion=...: each cell sets it; use --fus"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, set=["model.fusion=concat"]), "cmd")
  with pytest.raises(ConfigError, match="a cell is named twice"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, aggregations=["avgpool", "avgpool"]), "cmd")
  missing = r"no files match '/nonexistent/e-\*' \(/nonexistent does not exist\)$"
  with pytest.raises(ConfigError, match="^--eval_pattern: " + missing):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, eval_pattern="/nonexistent/e-*"), "cmd")
  # A pattern from the config is named as the config's: the sweep had blamed a flag not given.
  with pytest.raises(ConfigError, match="^the config's data.eval_pattern: " + missing):
    overrides = ["data.num_classes=32", "data.eval_pattern=/nonexistent/e-*"]
    flags = sweep_flags(tmp_path, eval_pattern=None, set=overrides)
    sweep_config.Sweep.from_flags(flags, "cmd")
  with pytest.raises(ConfigError, match="no such config"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, config="configs/nope.py"), "cmd")
  # What each cell's launch.py would refuse stops the sweep before it trains anything.
  bad_value = sweep_flags(tmp_path, set=["train.batch_size=-4"])
  with pytest.raises(ConfigError, match=r"cell avgpool,concat: config.train.batch_size=-4"):
    sweep_config.Sweep.from_flags(bad_value, "cmd")
  with pytest.raises(ConfigError, match=r"cell avgpol,concat: config.model.aggregator='avgpol'"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, aggregations=["avgpol"]), "cmd")
  with pytest.raises(ConfigError, match="takes no AGG,FUSION"):
    sweep_config.Sweep.from_flags(sweep_flags(tmp_path, config="configs/default.py"), "cmd")
  assert not os.path.exists(tmp_path / "sweep")


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


def _sweep(workdir, data, fusions: str, *more: str):
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
      *more,
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
  cells = table_row(text, "Avgpooling")
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
  assert table_row(text, "Avgpooling") == ["failed / 38.1", *cells]
  assert "- avgpool,audio: error:" in text and "not a directory" in text

  # Rerun with another batch size: the cells were skipped and reported under its header.
  third = _sweep(tmp_path, sweep_data, "concat,mfb", "--set=train.batch_size=4")
  assert third.returncode == 2, third.stdout[-3000:]
  assert last_line(third.stderr) == (
    f"error: cell avgpool,concat in {tmp_path} was trained with train.batch_size=8, and this "
    "sweep gives 4: rerun with the settings it was trained with, or give this sweep another "
    "--workdir"
  )
  assert (tmp_path / "results.md").read_text() == text
