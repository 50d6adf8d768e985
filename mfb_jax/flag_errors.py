"""One-line errors for the command line's flags and --config file, in the user's terms.

absl and ml_collections report a bad flag value, an unknown config field or a config file that
raised in their own words (a Python tuple, an attribute of a class, a traceback);
cli.parse_flags prints the line `one_line` makes of them instead.
"""

import re

from absl import flags


def one_line(e: Exception, argv: list[str], config_file: str, config_arg: str) -> str:
  """The one error line for an exception of absl's flag parsing or of loading the --config file
  (`config_file`, given `:config_arg`), in the user's terms."""
  message = str(e)
  # A flag's value of the wrong type: absl's reason is a Python tuple or int()'s own text (not
  # for --config=F:ARG, whose config file's own error that may be).
  if isinstance(e, flags.IllegalFlagValueError) and not message.startswith("flag --config="):
    for raw, plain in _WRONG_TYPE:
      message = re.sub(raw, plain, message)
  root = re.search(_NOT_A_CONFIG, message)
  if root and root[3].split(".")[0] == root[2]:  # An override of a config that is no ConfigDict.
    return f"{config_file}: get_config() returned an object of type {root[1]}, not a ConfigDict"
  if re.fullmatch(r"--\S+ does not take an argument", message):  # absl's, as a ValueError.
    return message
  if "Traceback" in message:  # The config file raised: keep its exception's line.
    last = message.strip().splitlines()[-1]
    if re.match(r"[\w.]*ConfigError: ", last):  # The project's own: it names what is wrong.
      return last.split(": ", 1)[1]
    last = re.sub(r"^[\w.]*ValueError: ", "", last)
    given = f"{config_file}:{config_arg}" if config_arg else config_file
    message = f"flag --config={given}: {last}"
  if "get_config() takes 0 positional arguments" in message:
    return f"{config_file} takes no :ARG (got {config_arg!r}); give --config={config_file}"
  if isinstance(e, AttributeError) and "get_config" in message:
    return f"{config_file}: a config file needs a get_config() function; it has none"
  if isinstance(e, AttributeError | KeyError):
    cleaned = message.replace("\\'", "").replace("'", "").replace('"', "")
    field, _, hint = cleaned.replace("\\n", " ").partition(" ")
    hint = f": {hint.strip().rstrip('.')}" if hint.strip() else ""
    if not any(field in parts for parts in _overrides(argv)):  # No override names it: the
      return f"{config_file}: {type(e).__name__}: {message}"  # config file's own error.
    field = _override_path(argv, field)
    from mfb_jax import config_fields  # Deferred: only this error needs configs/.

    if config_fields.in_default_config(field):  # A config file from before the field.
      return (
        f"config field {field!r} is not in {config_file} (configs/default.py has it: a config "
        "written for an older version? build it from default.get_config())"
      )
    where = "configs/default.py lists the fields"
    if field.startswith("model.") and not hint:  # A section of a module the user added?
      where += "; a new module's settings need a config.model.<name> section there first"
    return f"unknown config field {field!r}{hint} ({where})"
  if config_file and not isinstance(e, flags.Error) and config_file not in message:
    return f"{config_file}: {type(e).__name__}: {message}"  # The config file's own error.
  return message


_WRONG_TYPE = (
  (r"\('Non-boolean argument to boolean flag', '.*'\)$", "must be true or false"),
  (r"invalid literal for int\(\) with base 10: '.*'$", "must be a whole number"),
  (r"could not convert string to float: '.*'$", "must be a number"),
)
# ml_collections' text for `--config.data.x=V` where get_config() returned, say, an int.
_NOT_A_CONFIG = (
  r"Attribute <class '([\w.]+)'>\.(\w+) does not exist and the type does not support indexing\. "
  r"Attempting to lookup: ([\w.]+)"
)


def _override_path(argv: list[str], field: str) -> str:
  """'train.steps' for the unknown field 'steps' of --config.train.steps=V (`field` itself where
  no override, or more than one, has it)."""
  paths = {".".join(p[: p.index(field) + 1]) for p in _overrides(argv) if field in p}
  return paths.pop() if len(paths) == 1 else field


def _overrides(argv: list[str]) -> list[list[str]]:
  """The dotted paths of the --config.x.y=V overrides in argv, split: [['x', 'y'], ...]."""
  prefix = "--config."
  return [a.removeprefix(prefix).split("=", 1)[0].split(".") for a in argv if a.startswith(prefix)]
