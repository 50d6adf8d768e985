"""What every command line of the project shares: a quiet TensorFlow, one-line errors, --help.

launch.py and the `python -m mfb_jax.X` tools (synthetic, sweep, metrics, step_profile,
bench_input) all end bad input with one `error: ...` line on stderr and exit status 2 (the metrics
CLI: 1, as documented), and `--help` with exit status 0 (absl's own is 1, which reads as a bug).
"""

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Iterator

from absl import flags

from mfb_jax import flag_errors


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ start-up lines off stderr (a user's own setting wins). Call it before
  TensorFlow is imported; `import mfb_jax` does."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # TensorFlow's oneDNN kernels serve only its math ops, which tf.data's parsing never uses; left
  # on, they announce themselves on stderr before any log level applies.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def fail(message: str, code: int = 2) -> None:
  """Exits with `message` as one line: `error: ...` on stderr."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def given_twice(flag: str, values: list[str], after: str = "") -> None:
  """One line for a flag given more than once: its `values` as given, then `after`."""
  fail(f"{flag} is given {len(values)} times ({', '.join(values)}{after}); give one")


def no_positional_arguments(argv: list[str]) -> None:
  """One line and exit 2 where absl left arguments that are not flags (app.run's argv[1:])."""
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a --flag=value)")


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser for the argparse tools (model, metrics, scripts/): a bad or missing flag
  is one line, `error: ... (--help lists the options)`, exit status 2, not usage plus a line."""

  def error(self, message: str):
    fail(f"{message} (--help lists the options)")

  def parse_known_args(self, args=None, namespace=None):
    args = [_home(a) for a in (sys.argv[1:] if args is None else list(args))]  # As parse_flags.
    self._given_once(args)
    return super().parse_known_args(args, namespace)

  def _given_once(self, args: list[str]) -> None:
    """One line where an option is given twice with different values (argparse keeps the last
    without a word), as parse_flags says for the absl tools."""
    given: dict[str, list[tuple[str, str]]] = {}
    rest = iter(args)
    for arg in rest:
      if arg == "--":
        break
      option, equals, value = arg.partition("=")
      action = self._option_string_actions.get(option)
      if not isinstance(action, argparse._StoreAction):  # noqa: SLF001 - store_true, append...
        continue
      given.setdefault(action.dest, []).append((option, value if equals else next(rest, "")))
    for uses in given.values():
      if len({value for _, value in uses}) > 1:
        given_twice(uses[0][0], [f"{option}={value}" for option, value in uses])


def define_config_file(default: str | None, help_text: str, **kwargs) -> None:
  """config_flags.DEFINE_config_file("config", ...), whose definition reads the command line's
  --flagfile(s) already: one that cannot be read is one line here, not a traceback there."""
  from ml_collections import config_flags

  _with_flag_files(sys.argv[1:])
  config_flags.DEFINE_config_file("config", default, help_text, **kwargs)


def _with_flag_files(args: list[str]) -> list[str]:
  """`args` with each --flagfile's flags in its place; one that cannot be read is one line."""
  try:
    return flags.FLAGS.read_flags_from_files(args, force_gnu=False)
  except flags.Error as e:
    fail(str(e).removeprefix("ERROR:: "))
  except UnicodeDecodeError as e:
    fail(f"a --flagfile is not UTF-8 text ({e.reason} at byte {e.start})")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for app.run(..., flags_parser=parse_flags): a bad flag, a config file that
  is missing or raises, and an unknown `--config.x.y` field are each one line with exit status 2
  (`--debug`, where a program defines it, adds the traceback); --help exits 0. A value that
  starts with '~/' is under the home directory, as a shell would have it without the '='."""
  flag_files = any(a.lstrip("-").startswith("flagfile") for a in argv[1:])
  # A --flagfile's flags in its place, so that they are read as the command line's.
  expanded, typed = _expand([_home(a) for a in argv[1:]])
  argv = [argv[0], *expanded]
  config_args = _config_values(argv)
  if len(config_args) > 1:
    given_twice("--config", config_args, ", --flagfile's included" if flag_files else "")
  config_file, _, config_arg = (config_args[-1] if config_args else "").partition(":")
  # A config_flags.DEFINE_config_file flag (launch.py, step_profile), not the sweep's plain string.
  is_config_file = "config" in flags.FLAGS and type(flags.FLAGS["config"]).__name__ == "_ConfigFlag"
  wants_help = _wants_help(argv[1:])
  needs_config = is_config_file and flags.FLAGS["config"].default is None  # launch.py's.
  if needs_config and not config_args and not wants_help:
    _no_unknown_flag(argv)  # '--conifg=F' is that flag misspelled, not --config left out.
    overrides = [a.split("=")[0] for a in argv[1:] if a.lstrip("-").startswith("config.")]
    given = f" ({overrides[0]} changes a field of it)" if overrides else ""
    fail(f"--config=FILE is required{given}: e.g. --config=configs/default.py")
  if is_config_file and config_args and not config_file:  # ml_collections: "Path to ... ''".
    fail("--config is empty: give a config file, e.g. --config=configs/default.py")
  if is_config_file and config_file.startswith("-"):  # `--config --workdir=W`: absl takes it.
    fail(f"--config has no value (the next argument is {config_file}): e.g. --config=FILE.py")
  if is_config_file and config_file and os.path.isdir(config_file):
    fail(f"--config={config_file} is a folder: give a config file, e.g. configs/default.py")
  if is_config_file and config_file and not os.path.isfile(config_file):
    fail(f"config file not found: {config_file}")
  if not wants_help:
    _given_once(argv[1:], typed)
  if is_config_file and config_file and not config_file.endswith(".py"):
    fail(f"--config={config_file}: a config is a Python file with get_config() (configs/tiny.py)")
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help, --helpfull, --helpxml: usage printed, exit status 1.
    sys.exit(0 if e.code == 1 else e.code)
  except Exception as e:  # noqa: BLE001 - flags.Error, or a config override/loading error.
    if "--debug" in argv:
      traceback.print_exc()
    fail(flag_errors.one_line(e, argv, config_file, config_arg))


def home(value: str) -> str:
  """A flag's value with the home directory for a leading '~' or '~/': a shell expands '~' only
  at a word's start (so '--workdir=~/runs/a' made a folder named '~')."""
  return os.path.expanduser(value) if value == "~" or value.startswith("~/") else value


def _home(arg: str) -> str:
  """'--flag=~/x' with home(): the value of the flag."""
  name, equals, value = arg.partition("=")
  return f"{name}={home(value)}" if name.startswith("-") and equals else arg


def _config_values(argv: list[str]) -> list[str]:
  """The values of --config=V and of --config V (absl takes both, with one dash or two)."""
  values = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    name, equals, value = arg.partition("=")
    if name in ("--config", "-config"):
      values.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else ""))
  return values


def config(flag_values=flags.FLAGS):
  """The parsed --config ConfigDict; one line and exit 2 where its file failed to load (a default
  config path that is not there, run from another directory) or returned something else."""
  import ml_collections

  loaded = flag_values.config
  name = flag_values["config"].config_filename
  if type(loaded).__name__ == "_ErrorConfig":  # get_config() raised an OSError.
    fail(f"{name}: {loaded._error}")
  if not isinstance(loaded, ml_collections.ConfigDict):
    kind = type(loaded).__name__
    fail(f"{name}: get_config() returned an object of type {kind}, not a ConfigDict")
  return loaded


def _expand(args: list[str]) -> tuple[list[str], list[bool]]:
  """`args` with each --flagfile's flags in its place (nested ones too), and for each argument
  whether it was typed on the command line (not read from a --flagfile)."""
  expanded, typed, rest = [], [], list(args)
  while rest:
    arg = rest.pop(0)
    if arg == "--":
      expanded, typed = expanded + [arg, *rest], typed + [True] * (1 + len(rest))
      break
    if arg.startswith("-") and arg.lstrip("-").partition("=")[0] == "flagfile":
      chunk = [arg] if "=" in arg else [arg, *rest[:1]]
      del rest[: len(chunk) - 1]
      read = [_home(a) for a in _with_flag_files(chunk)]
      expanded, typed = expanded + read, typed + [False] * len(read)
    else:
      expanded.append(arg)
      typed.append(True)
  return expanded, typed


def _flags_given(args: list[str]) -> Iterator[tuple[str, object, str, int]]:
  """(name as written, its program flag or None, value as given, the index in `args` of the
  argument that named it) for each flag in `args` up to '--'; a value given as the next argument
  (`--mode eval`) is taken with its flag, and `--noX` is X=false for a boolean X."""
  rest = iter(enumerate(args))
  for index, arg in rest:
    if arg == "--":
      return
    if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit():  # '-1': a value.
      continue
    name, equals, value = arg.lstrip("-").partition("=")
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    positive = flags.FLAGS[name[2:]] if name.startswith("no") and name[2:] in flags.FLAGS else None
    if flag is None and positive is not None and positive.boolean and not equals:
      yield name[2:], positive, "false", index
    elif equals or flag is None:
      yield name, flag, value, index
    else:
      yield name, flag, "true" if flag.boolean else next(rest, (0, ""))[1], index


def _wants_help(args: list[str]) -> bool:
  """Whether `args` ask for help (--help, --helpfull, ...; not --nohelp nor --help=false)."""
  for name, _, value, _ in _flags_given(args):
    if name in ("help", "helpfull", "helpshort", "helpxml", "?"):
      try:
        if flags.BooleanParser().parse(value or "true"):
          return True
      except ValueError:
        return True  # absl's own line for it.
  return False


def _no_unknown_flag(argv: list[str]) -> None:
  """One line naming the first flag of `argv` that no program flag has (absl's own words)."""
  for name, flag, _, _ in _flags_given(argv[1:]):
    if flag is None and not name.startswith("config.") and name != "undefok":
      close = difflib.get_close_matches(name, list(flags.FLAGS), n=1)
      hint = f". Did you mean: {close[0]} ?" if close else ""
      fail(f"Unknown command line flag '{name}'{hint}")


def _given_once(args: list[str], typed: list[bool]) -> None:
  """One line where a flag is given twice with different values (absl keeps the last without a
  word: `--mode=eval --mode=predict` predicted). `args`: the command line with each --flagfile's
  flags in its place, `typed[i]` whether args[i] was typed. A typed value stands: nothing after
  it may differ. A --flagfile's value may be overridden after it (typed, or by a later
  --flagfile: flagfiles layer). --config.x.y overrides may repeat: the last one counts."""
  given: dict[int, list[tuple[str, str, object, bool]]] = {}
  for name, flag, value, index in _flags_given(args):
    if flag is None or isinstance(flag, flags.MultiFlag) or name.startswith("config"):
      continue  # Unknown (absl names it), repeatable, or --config (checked apart).
    try:
      parsed = repr(flag.parser.parse(value))
    except (ValueError, TypeError, flags.Error):
      parsed = None  # absl names the bad value.
    given.setdefault(id(flag), []).append((name, value, parsed, typed[index]))
  for uses in given.values():
    if any(parsed is None for _, _, parsed, _ in uses):
      continue
    values = [parsed for _, _, parsed, _ in uses]
    if any(use[3] and set(values[i + 1 :]) - {values[i]} for i, use in enumerate(uses)):
      shown = [f"--{n}={v}{'' if t else ' (from a --flagfile)'}" for n, v, _, t in uses]
      given_twice(f"--{uses[0][0]}", shown)
