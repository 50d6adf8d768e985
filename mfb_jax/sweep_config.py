"""What a sweep runs: its cells, their resolved settings and each cell's launch.py command line."""

import ast
import dataclasses
import datetime
import glob
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

import ml_collections

from mfb_jax import cli, file_patterns
from mfb_jax.errors import ConfigError, WorkdirError

REPO = Path(__file__).resolve().parents[1]
RUNS_FILE = "sweep_runs.jsonl"  # One line per sweep invocation: its date and command line.
# Fields the sweep sets itself from its own flags; --set may not set them too.
OWN_FIELDS = {
  "train.num_steps": "--steps",
  "train.eval_every": "--eval_every",
  "data.train_pattern": "--train_pattern",
  "data.eval_pattern": "--eval_pattern",
}


# Fields each cell sets (its AGG,FUSION): --set may not set them for every cell.
CELL_FIELDS = {"model.aggregator": "--aggregations", "model.fusion": "--fusions"}


def load_config(config_path: str, arg: str) -> ml_collections.ConfigDict:
  """Calls get_config(arg) of a config file, as launch.py's `--config=FILE:ARG` does."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # Config files import `configs.default`.
  if not os.path.isfile(config_path):
    raise ConfigError(f"--config={config_path}: no such config file")
  name = "_sweep_config_" + Path(config_path).stem
  spec = importlib.util.spec_from_file_location(name, config_path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not inspect.signature(module.get_config).parameters:  # E.g. configs/default.py.
      raise ConfigError(f"--config={config_path}: its get_config() takes no AGG,FUSION argument")
    return module.get_config(arg)
  except ValueError:  # ConfigError too: the config's own line about a bad value or argument.
    raise
  except Exception as e:  # noqa: BLE001 - the config file's own error: a traceback, exit 1.
    raise ConfigError(f"--config={config_path}: {type(e).__name__}: {e}") from e


def parse_sets(values: list[str]) -> list[tuple[str, str]]:
  """['data.format=video', 'config.seed=1'] -> [('data.format', 'video'), ('seed', '1')]."""
  pairs = []
  for value in values:
    field, sep, raw = value.partition("=")
    field = field.strip().removeprefix("config.")
    if not sep or not field:
      raise ConfigError(f"--set={value!r} must look like FIELD=VALUE, e.g. data.format=video")
    pairs.append((field, cli.home(raw)))  # As the cell's launch.py reads --config.FIELD=VALUE.
  return pairs


def _coerce(current, raw: str, field: str):
  """`raw` as the type of the field's current value (as ml_collections' flag parser does)."""
  try:
    if isinstance(current, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(raw)
      return raw.lower() in ("true", "1")
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    kind = type(current).__name__
    raise ConfigError(f"--set={field}={raw}: expected a {kind} like {current!r}") from None


def apply_overrides(config: ml_collections.ConfigDict, pairs: list[tuple[str, str]]) -> None:
  """Sets each FIELD=VALUE on the config; an unknown field raises ConfigError."""
  for field, raw in pairs:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"--set={field}={raw}: the config has no field {field}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"--set={field}={raw}: {field} is a section, not a field")
    node[leaf] = _coerce(node[leaf], raw, field)


def _as_run(config, steps: int, eval_every: int, train: str, eval_: str):
  """A copy of a cell's config with the sweep's own settings: what its launch.py resolves."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.num_steps, config.train.eval_every = steps, eval_every
  config.data.train_pattern, config.data.eval_pattern = train, eval_
  return config


def _validate_cell(config, cell: str, steps: int, eval_every: int, train: str, eval_: str):
  """launch.py's checks of one cell's config as the sweep will run it, now rather than per cell."""
  from mfb_jax import config_checks  # Deferred: imports flax for the model registries.

  config = _as_run(config, steps, eval_every, train, eval_)
  try:
    config_checks.validate(config, "train")
  except ConfigError as e:
    raise ConfigError(f"cell {cell}: {e}") from e


def _check_pattern(pattern: str, what: str, from_flag: bool) -> None:
  if not pattern:
    raise ConfigError(f"no {what} data: pass --{what}_pattern=GLOB (or set it in the config)")
  source = f"--{what}_pattern" if from_flag else f"the config's data.{what}_pattern"
  for part in file_patterns.split(pattern):
    local = os.path.expanduser(part)
    if "://" not in part and not glob.glob(local):
      # Deferred (TensorFlow): only where Python's glob, which lacks '[[:digit:]]' and '[^...]',
      # matched nothing. The runs list files with TensorFlow's (glibc's fnmatch).
      from mfb_jax import input_files, tfrecord_files

      if input_files.globbed(part):
        continue
      where = tfrecord_files.unreadable_directory(local)
      raise ConfigError(f"{source}: no files match {part!r}{where}")


@dataclasses.dataclass
class Sweep:
  """The settings of one sweep invocation."""

  workdir: str
  config_path: str
  cells: list[tuple[str, str]]
  steps: int
  eval_every: int
  train_pattern: str
  eval_pattern: str
  overrides: list[tuple[str, str]]
  data_label: str = ""
  command: str = ""
  batch_size: int = 0
  num_classes: int = 0
  data_format: str = ""
  verbose: bool = False
  pattern_flags: tuple[str, ...] = ()  # Which of train/eval patterns came from flags.
  date: str = dataclasses.field(
    default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds")
  )

  @classmethod
  def from_flags(cls, flags, command: str) -> "Sweep":
    """Resolves every cell's config now, so a bad name or override fails before any training."""
    if ":" in flags.config:
      raise ConfigError(f"--config={flags.config}: give the file only; the sweep adds :AGG,FUSION")
    overrides = parse_sets(flags.set)
    own = {"train.num_steps": flags.steps, "train.eval_every": flags.eval_every}
    own.update({"data.train_pattern": flags.train_pattern, "data.eval_pattern": flags.eval_pattern})
    for field, _ in overrides:
      if own.get(field) is not None:
        raise ConfigError(f"--set={field}=... and {OWN_FIELDS[field]} both given; keep one")
      if field in CELL_FIELDS:  # The cell's name would then not be its model.
        raise ConfigError(f"--set={field}=...: each cell sets it; use {CELL_FIELDS[field]}")
    cells = [(a.strip(), f.strip()) for a in flags.aggregations for f in flags.fusions]
    if not cells:
      raise ConfigError("no cells: --aggregations and --fusions must each name at least one")
    if len(set(cells)) < len(cells):
      raise ConfigError("a cell is named twice: --aggregations and --fusions each list a name once")
    config_path = os.path.abspath(flags.config)
    configs = {}
    for agg, fusion in cells:
      configs[(agg, fusion)] = config = load_config(config_path, f"{agg},{fusion}")
      apply_overrides(config, overrides)
    first = configs[cells[0]]
    steps = flags.steps if flags.steps is not None else first.train.num_steps
    if flags.eval_every is not None:
      eval_every = flags.eval_every
    elif flags.steps is not None:
      eval_every = max(1, steps // 10)  # About ten points per GAP curve.
    else:
      eval_every = first.train.eval_every
    if steps < 1 or eval_every < 1:
      raise ConfigError(f"--steps={steps} and --eval_every={eval_every} must be >= 1")
    train_pattern = flags.train_pattern or first.data.train_pattern
    eval_pattern = flags.eval_pattern or first.data.eval_pattern
    _check_pattern(train_pattern, "train", bool(flags.train_pattern))
    _check_pattern(eval_pattern, "eval", bool(flags.eval_pattern))
    for (agg, fusion), config in configs.items():  # Each cell's launch.py would refuse it.
      _validate_cell(config, f"{agg},{fusion}", steps, eval_every, train_pattern, eval_pattern)
    return cls(
      workdir=os.path.abspath(flags.workdir),
      config_path=config_path,
      cells=cells,
      steps=steps,
      eval_every=eval_every,
      train_pattern=train_pattern,
      eval_pattern=eval_pattern,
      overrides=overrides,
      data_label=flags.data_label,
      command=command,
      batch_size=first.train.batch_size,
      num_classes=first.data.num_classes,
      data_format=first.data.format,
      verbose=flags.verbose,
      pattern_flags=tuple(k for k in ("train", "eval") if getattr(flags, f"{k}_pattern")),
    )

  def cell_config(self, agg: str, fusion: str) -> ml_collections.ConfigDict:
    """The config one cell's launch.py resolves (its config.json, once it has trained)."""
    config = load_config(self.config_path, f"{agg},{fusion}")
    apply_overrides(config, self.overrides)
    return _as_run(config, self.steps, self.eval_every, self.train_pattern, self.eval_pattern)

  def cell_dir(self, agg: str, fusion: str) -> str:
    return os.path.join(self.workdir, f"{agg}_{fusion}")

  def launch_args(self, agg: str, fusion: str) -> list[str]:
    """The launch.py command line of one cell (this Python, this checkout's launch.py)."""
    args = [sys.executable, str(REPO / "launch.py"), f"--config={self.config_path}:{agg},{fusion}"]
    args.append(f"--workdir={self.cell_dir(agg, fusion)}")
    args += [f"--config.{field}={raw}" for field, raw in self.overrides]
    args.append(f"--config.train.num_steps={self.steps}")
    args.append(f"--config.train.eval_every={self.eval_every}")
    if "train" in self.pattern_flags:
      args.append(f"--config.data.train_pattern={self.train_pattern}")
    if "eval" in self.pattern_flags:
      args.append(f"--config.data.eval_pattern={self.eval_pattern}")
    return args

  def meta(self) -> dict:
    """The settings results.md and results.json report."""
    keys = ("date", "command", "config_path", "data_label", "train_pattern", "eval_pattern")
    keys += ("steps", "eval_every", "batch_size", "num_classes", "data_format")
    meta = {k: getattr(self, k) for k in keys}
    meta["config_path"] = os.path.relpath(self.config_path, REPO)
    meta["overrides"] = [f"{field}={raw}" for field, raw in self.overrides]
    return meta

  def hold_lock(self) -> None:
    """An flock on DIR/.sweep.lock for the life of this process (the kernel drops it however the
    process ends): a second sweep in DIR would train the same cells, its refused ones reported
    as failed in the shared results. A WorkdirError where DIR is held, or is no folder."""
    import fcntl  # noqa: PLC0415 - POSIX only, like the training lock.

    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise WorkdirError(f"--workdir={self.workdir} is a file, not a folder")
    path = os.path.join(self.workdir, ".sweep.lock")
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"cannot create {path} ({e.strerror})") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirError(
        f"sweep {self.workdir} is in use by another sweep ({holder}); wait for it to finish, "
        "stop it, or use another --workdir"
      ) from None
    except OSError:  # A file system without flock: no lock, as for training.
      return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}".encode())
    _HELD.append(fd)  # Open, and so held, until the process ends.

  def record_run(self) -> None:
    """Appends this invocation to DIR/sweep_runs.jsonl (results.md lists every run); a line an
    earlier run left cut short (a full disk, a kill) stays alone on its line."""
    from mfb_jax import workdir_files  # Deferred: imports JAX.

    path = os.path.join(self.workdir, RUNS_FILE)
    with workdir_files.write_errors(path):
      os.makedirs(self.workdir, exist_ok=True)
    cells = [f"{a},{f}" for a, f in self.cells]
    run = {"date": self.date, "command": self.command, "cells": cells}
    workdir_files.append_line(path, json.dumps(run))


_HELD: list[int] = []  # The sweep lock's file, open for the life of the process.
