"""Label names from a YouTube-8M vocabulary CSV, for human-readable predictions.

Reads both published layouts: the 2018 `vocabulary.csv` (columns Index, ..., Name, ...) and the
`label_names.csv` files (columns label_id, label_name; 2017 and 2018).
"""

import csv
import io

import tensorflow as tf

from mfb_jax import tf_errors, workdir_files
from mfb_jax.errors import ConfigError

ID_COLUMNS = ("Index", "label_id")
NAME_COLUMNS = ("Name", "label_name")


def load(path: str) -> dict[int, str]:
  """{label id: name}; ConfigError naming the file if it is missing or has neither layout."""
  try:
    if not tf.io.gfile.exists(path):
      raise ConfigError(f"config.predict.vocabulary: no such file {path}")
    if tf.io.gfile.isdir(path):
      raise ConfigError(f"config.predict.vocabulary: {path} is a directory, not a vocabulary file")
    return _read(path)
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
  except tf.errors.OpError as e:  # A URL of no file system, an unreachable bucket.
    raise ConfigError(
      f"config.predict.vocabulary: cannot read {path} ({tf_errors.message(e)})"
    ) from e


def _read(path: str) -> dict[int, str]:
  with tf.io.gfile.GFile(path) as f:
    text = f.read().removeprefix("\ufeff")  # The byte-order mark of Excel's "CSV UTF-8".
  reader = csv.DictReader(io.StringIO(text))
  header = reader.fieldnames or []
  id_col = next((c for c in ID_COLUMNS if c in header), None)
  name_col = next((c for c in NAME_COLUMNS if c in header), None)
  if id_col is None or name_col is None:
    raise ConfigError(
      f"{path}: not a vocabulary CSV (needs columns Index/Name or label_id/label_name; "
      f"found {', '.join(header[:6])})"
    )
  names = {}
  for row in reader:
    try:
      label = int(row[id_col])
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{path}: bad label id in line {reader.line_num}: {e}") from e
    if label < 0:
      raise ConfigError(f"{path}: label id {label} in line {reader.line_num} is negative")
    if row[name_col] is None:  # A row cut short: its name would read "None".
      raise ConfigError(f"{path}: line {reader.line_num} has no {name_col} for label {label}")
    if names.get(label, row[name_col]) != row[name_col]:  # Which name won hung on the order.
      raise ConfigError(
        f"{path}: label id {label} named twice ({names[label]!r}, then {row[name_col]!r} in "
        f"line {reader.line_num})"
      )
    names[label] = row[name_col]
  if not names:  # It would name nothing, and was warned about as a vocabulary of 0 classes.
    raise ConfigError(f"{path}: a vocabulary CSV without labels (a header, no rows)")
  return names


def name_predictions(predictions_csv: str, vocabulary_csv: str, output_csv: str) -> int:
  """Writes VideoId,Labels rows ('name (score); ...'); returns the number of videos."""
  names = load(vocabulary_csv)
  count = 0
  # tf.io.gfile: the workdir may be a URL (gs://...), where these two files are.
  with tf.io.gfile.GFile(predictions_csv) as f, workdir_files.atomic_file(output_csv) as out:
    reader, writer = csv.reader(f), csv.writer(out, lineterminator="\n")
    next(reader)  # Header.
    writer.writerow(["VideoId", "Labels"])
    for video_id, pairs in reader:
      tokens = pairs.split()
      labels = [
        f"{names.get(int(label), f'label {label}')} ({float(score):.3f})"
        for label, score in zip(tokens[0::2], tokens[1::2], strict=True)
      ]
      writer.writerow([video_id, "; ".join(labels)])
      count += 1
  return count
