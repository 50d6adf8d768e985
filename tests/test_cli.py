"""Every command line of the project: bad input is one stderr line and exit 2, --help exits 0."""

import os
import subprocess

import pytest
from conftest import PYTHON, REPO

from mfb_jax import cli

# No TF_CPP_MIN_LOG_LEVEL from the test environment: the programs must quieten TensorFlow
# themselves (its C++ start-up notices came before the error line of every tool but launch.py).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [PYTHON, *args],
    cwd=REPO,
    env={**ENV, **(env or {})},
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args, error",
  [
    (["launch.py", "--config=configs/default.py:x", "--workdir=/tmp/w"], "takes no :ARG"),
    (["launch.py", "--config", "configs/default.py:x", "--workdir=/tmp/w"], "takes no :ARG"),
    (["-m", "mfb_jax.sweep", "--workdir=/tmp/w", "--stpes=3"], "Did you mean: steps"),
    (["-m", "mfb_jax.sweep", "--workdir=/tmp/w", "extra"], "unexpected arguments: extra"),
    (
      ["-m", "mfb_jax.step_profile", "--config=configs/tiny.py", "--config.train.batch_sise=3"],
      "unknown config field 'train.batch_sise'",
    ),
    (
      ["launch.py", "--config=configs/tiny.py", "--config.model.hadamard.dim=4"],
      "unknown config field 'model.hadamard' (configs/default.py lists the fields; a new "
      "module's settings need a config.model.<name> section there first)",
    ),
    (["-m", "mfb_jax.bench_input", "--batch_size=0"], "--batch_size=0: must be >= 1"),
    # Overrides without --config read as an unknown flag 'config.data.train_pattern'.
    (
      ["launch.py", "--workdir=/tmp/w", "--config.data.train_pattern=/x"],
      "error: --config=FILE is required (--config.data.train_pattern changes a field of it): "
      "e.g. --config=configs/default.py",
    ),
    (["launch.py", "--workdir=/tmp/w"], "error: --config=FILE is required: e.g. --config="),
    # ml_collections' words: "error: : Path to config file is an empty string."
    (["launch.py", "--config=", "--workdir=/tmp/w"], "error: --config is empty: give a config"),
    (["launch.py", "--config=:netvlad", "--workdir=/tmp/w"], "error: --config is empty: give"),
    # "config file not found: --workdir=/tmp/w"
    (["launch.py", "--config", "--workdir=/tmp/w"], "--config has no value (the next argument"),
    (["-m", "mfb_jax.bench_input", "--pattern=/nonexistent/x-*"], "no file matches"),
    # argparse printed its usage line before the error.
    (["-m", "mfb_jax.model", "--counts"], "error: unrecognized arguments: --counts (--help"),
    (["-m", "mfb_jax.model"], "error: nothing to do: pass --count (--help lists the options)"),
    (["-m", "mfb_jax.metrics", "--labels=x"], "the following arguments are required: --pred"),
    # absl kept the last value without a word (predict ran); --config.x.y overrides may repeat.
    (
      [
        "launch.py",
        "--config=configs/tiny.py",
        "--mode=eval",
        "--workdir=/tmp/w",
        "--mode",
        "predict",
      ],
      "error: --mode is given 2 times (--mode=eval, --mode=predict); give one",
    ),
    (["-m", "mfb_jax.sweep", "--workdir=/tmp/w", "--noverbose", "--verbose"], "--verbose is given"),
    # "('Non-boolean argument to boolean flag', 'yes')", "invalid literal for int() with ...".
    (
      ["launch.py", "--config=configs/tiny.py", "--config.model.context_gating=yes"],
      "error: flag --config.model.context_gating=yes: must be true or false",
    ),
    (["-m", "mfb_jax.bench_input", "--batch_size=many"], "--batch_size=many: must be a whole num"),
    (
      ["-m", "mfb_jax.metrics", "--predictions=a.csv", "--labels=x", "--predictions", "b.csv"],
      "error: --predictions is given 2 times (--predictions=a.csv, --predictions=b.csv); give one",
    ),
    (["launch.py", "--config=configs/", "--workdir=/tmp/w"], "--config=configs/ is a folder"),
    # "--config=FILE is required", and "got None" for a config needing its argument.
    (["launch.py", "--conifg=x.py", "--workdir=/tmp/w"], "flag 'conifg'. Did you mean: config ?"),
    (["launch.py", "--config=configs/paper.py", "--workdir=/tmp/w"], "}; none was given (e.g."),
    # The project's own config errors stand alone: not after a cut "flag --config=FILE:".
    (
      ["launch.py", "--config=configs/workdir.py:/nonexistent/w", "--workdir=/tmp/w"],
      "error: no /nonexistent/w/config.json: is /nonexistent/w a workdir that has been trained?\n",
    ),
  ],
)
def test_bad_input_is_one_line_and_exit_2(args, error):
  result = _run(args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  assert error in result.stderr


def test_a_config_files_own_error_names_the_file(tmp_path):
  config = tmp_path / "mine.py"
  config.write_text("def get_config():\n  return undefined_name\n")
  result = _run(["launch.py", f"--config={config}", f"--workdir={tmp_path / 'w'}"])
  assert result.returncode == 2, result.stderr
  assert result.stderr == f"error: {config}: NameError: name 'undefined_name' is not defined\n"
  # Its own ValueError is kept as it is, not taken for a flag of the wrong type.
  config.write_text("def get_config(arg):\n  return int(arg)\n")
  result = _run(["launch.py", f"--config={config}:abc", f"--workdir={tmp_path / 'w'}"])
  assert result.stderr.endswith("invalid literal for int() with base 10: 'abc'\n"), result.stderr
  # Its own KeyError is its own, not an "unknown config field" no override named.
  config.write_text("def get_config():\n  return {}['depth']\n")
  result = _run(["launch.py", f"--config={config}", f"--workdir={tmp_path / 'w'}"])
  assert result.stderr == f"error: {config}: KeyError: 'depth'\n", result.stderr


def test_the_metrics_cli_error_comes_without_tensorflow_notices(tmp_path):
  predictions = tmp_path / "p.csv"
  predictions.write_text("VideoId,LabelConfidencePairs\nv1,3 0.5\n")
  result = _run(["-m", "mfb_jax.metrics", f"--predictions={predictions}", "--labels=/no/l-*"])
  expected = "error: no file matches '/no/l-*' (/no does not exist)\n"
  assert (result.returncode, result.stderr) == (1, expected)


@pytest.mark.parametrize("program", [["launch.py"], ["-m", "mfb_jax.sweep"]])
def test_help_exits_0(program):
  result = _run([*program, "--help"])
  assert result.returncode == 0, result.stderr
  assert "--workdir" in result.stdout
  assert "  --config: " in result.stdout  # launch.py listed it only under --helpfull.


def test_a_world_json_inside_the_output_dir_is_refused_before_any_shard(tmp_path):
  out = tmp_path / "data"
  args = ["-m", "mfb_jax.synthetic", f"--output_dir={out}", f"--world_json={out}/world.json"]
  result = _run([*args, "--num_train=4", "--num_eval=0", "--num_classes=64"])
  assert result.returncode == 2 and "inside --output_dir" in result.stderr, result.stderr
  assert not out.exists() or not list(out.iterdir())


def test_a_flag_value_under_the_home_directory(monkeypatch, tmp_path):
  # A shell expands '~' only at a word's start: '--workdir=~/runs/a' made a folder named '~'.
  monkeypatch.setenv("HOME", "/home/me")
  assert cli._home("--workdir=~/runs/a") == "--workdir=/home/me/runs/a"
  assert cli._home("--config.data.train_pattern=~") == "--config.data.train_pattern=/home/me"
  for unchanged in ("--output_dir=a/~/b", "--workdir=~other/x", "~/positional", "--flag"):
    assert cli._home(unchanged) == unchanged
  # In a --flagfile too (absl read it after parse_flags had expanded the command line).
  flagfile = tmp_path / "flags"
  # Its --mode=train is overridden by the command line's --mode=eval (not "given 2 times").
  flagfile.write_text(
    "--workdir=~/w\n--config=configs/tiny.py\n--config.data.eval_pattern=x\n--mode=train\n"
  )
  result = _run(["launch.py", f"--flagfile={flagfile}", "--mode=eval"], env={"HOME": "/home/me"})
  assert (
    result.stderr
    == "error: workdir /home/me/w does not exist: train into it first (--mode=train)\n"
  )
  result = _run(["launch.py", f"--flagfile={tmp_path}/gone"])
  assert result.returncode == 2 and result.stderr.startswith("error: Unable to open flagfile: ")
  flagfile.write_bytes(b"--workdir=/tmp/\xff\n")  # A traceback (UnicodeDecodeError) before.
  result = _run(["launch.py", f"--flagfile={flagfile}"])
  assert (result.returncode, result.stderr.count("\n")) == (2, 1)
  assert result.stderr.startswith("error: a --flagfile is not UTF-8 text")
  parser = cli.ArgumentParser()  # The argparse tools' (metrics, scripts/) too.
  parser.add_argument("--predictions")
  assert parser.parse_args(["--predictions=~/p.csv"]).predictions == "/home/me/p.csv"


def test_a_flag_given_twice_is_compared_by_value(monkeypatch, capsys):
  from absl import flags

  own = flags.FlagValues()
  flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "", flag_values=own)
  flags.DEFINE_bool("debug", False, "", flag_values=own)
  flags.DEFINE_integer("verbosity", 0, "", short_name="v", flag_values=own)
  flags.DEFINE_string("workdir", None, "", flag_values=own)
  monkeypatch.setattr(flags, "FLAGS", own)
  # The same value written two ways, a --flagfile's value overridden after it (typed, or by a
  # later --flagfile: they layer), overrides, what follows '--', and a bad value (absl names it)
  # are all fine. `typed`: whether each argument was typed (True) or read from a --flagfile.
  for args, typed in [
    (["--debug=True", "--debug"], None),
    (["--debug", "--debug=true"], None),
    (["--mode", "eval", "--mode=eval"], None),
    (["--mode=train", "--mode=eval"], [False, True]),
    (["--mode=train", "--mode=eval"], [False, False]),
    (["--config.train.num_steps=3", "--config.train.num_steps=4"], None),
    (["--workdir", "-w", "--", "--workdir=x"], None),
    (["--verbosity=x", "--verbosity=1"], None),
  ]:
    cli._given_once(args, [True] * len(args) if typed is None else typed)
  for args, typed, line in [
    (["--debug", "--nodebug"], None, "--debug is given 2 times (--debug=true, --debug=false)"),
    (["--v=1", "--verbosity=2"], None, "--v is given 2 times (--v=1, --verbosity=2)"),  # One flag.
    (["--workdir", "-w", "--workdir=w"], None, "--workdir is given 2 times (--workdir=-w, --w"),
    # Typed, then a --flagfile's: the file's silently won.
    (["--mode=eval", "--mode=train"], [True, False], "(--mode=eval, --mode=train (from a --flag"),
    # Two typed values with a --flagfile repeating the first between them.
    (["--mode=eval", "--mode=eval", "--mode=train"], [True, False, True], "given 3 times"),
  ]:
    with pytest.raises(SystemExit):
      cli._given_once(args, [True] * len(args) if typed is None else typed)
    err = capsys.readouterr().err
    assert err.startswith("error: --") and line in err and err.endswith("; give one\n"), err


def test_each_argument_is_told_typed_or_read_from_a_flagfile(tmp_path):
  # By position: a flagfile line identical to a typed argument was taken for the typed one.
  (tmp_path / "a.flags").write_text("--seed=2\n")
  (tmp_path / "layered.flags").write_text(f"--flagfile={tmp_path / 'a.flags'}\n--seed=3\n")
  args = [
    "--flagfile",
    str(tmp_path / "a.flags"),
    "--seed=2",
    f"--flagfile={tmp_path}/layered.flags",
  ]
  assert cli._expand(args) == (
    ["--seed=2", "--seed=2", "--seed=2", "--seed=3"],
    [False, True, False, False],
  )
  assert cli._expand(["--x=1", "--", "--flagfile=f"]) == (
    ["--x=1", "--", "--flagfile=f"],
    [True] * 3,
  )
  assert cli._wants_help(["--helpfull"]) and cli._wants_help(["--help=true"])
  assert not cli._wants_help(["--nohelp"]) and not cli._wants_help(["--workdir", "help"])
