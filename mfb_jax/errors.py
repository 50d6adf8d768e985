"""User-facing errors: bad input that launch.py reports as one line and a non-zero exit."""


class UserError(Exception):
  """Bad input or configuration; the message is shown to the user as one line."""


class DataError(UserError):
  """Missing, empty, corrupt or malformed data files."""


class ConfigError(UserError, ValueError):
  """An invalid config value; the message names the field and the allowed values."""


class CheckpointError(UserError):
  """A workdir checkpoint that cannot be used with this config."""


class WorkdirError(UserError):
  """A workdir that cannot be used: not writable, or held by another training run."""


class TrainingError(UserError):
  """Training cannot go on (e.g. a NaN loss); no broken state was saved."""
