r"""Scores a Kaggle-format predictions CSV against the labels in YouTube-8M tfrecords.

  python -m mfb_jax.metrics --predictions=predictions.csv --labels='/data/validate*.tfrecord'

prints one JSON line: gap (GAP@k), map, hit_at_1, perr, num_examples (labeled videos scored),
num_predicted (CSV rows), top_k. The CSV is `VideoId,LabelConfidencePairs` with rows
`id,"l1 s1 l2 s2 ..."`. Videos in the labels but not in the CSV count with no predictions; CSV ids
missing from the labels are an error. The metrics come from mfb_jax.metrics.MetricsAccumulator,
the same code as training's evaluation; only the per-video summary is built here, from the pairs.
A gzipped CSV (predictions.csv.gz) is read as it is.
"""

import contextlib
import csv
import gzip
import io
import itertools
import json
import math
import os
import sys
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from mfb_jax import cli
from mfb_jax.errors import DataError, UserError
from mfb_jax.metrics import MetricsAccumulator

HEADER = ["VideoId", "LabelConfidencePairs"]
_NO_PREDICTIONS = (np.zeros(0, np.int32), np.zeros(0, np.float32))
_CHUNK = 4096  # Videos summarized per accumulator call.


def read_predictions(path: str, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Video id -> (class ids, scores), each row ranked by score then class id."""
  try:
    with open(path, "rb", buffering=0) as raw:  # Once: the path may be a pipe (<(zcat p.gz)).
      head = b""
      while len(head) < 2 and (chunk := raw.read(2 - len(head))):  # A pipe may give 1 byte.
        head += chunk
      binary = io.BufferedReader(_Prefixed(head, raw))
      if head == b"\x1f\x8b":  # A gzipped CSV, as Kaggle submissions often are.
        binary = gzip.GzipFile(fileobj=binary)
      # utf-8-sig: a CSV saved by Excel and others starts with a byte-order mark.
      with io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as f:
        return _parse_rows(path, csv.reader(f), num_classes)
  except FileNotFoundError:
    raise DataError(f"{path}: predictions file not found") from None
  except (csv.Error, UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: not a readable CSV file ({e})") from None
  except OSError as e:  # A directory, no permission.
    raise DataError(f"{path}: cannot read the predictions file ({e.strerror or e})") from None


class _Prefixed(io.RawIOBase):
  """The bytes `head`, already read from `rest`, then the rest of `rest`."""

  def __init__(self, head: bytes, rest):
    self.head, self.rest = head, rest

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    if not self.head:
      return self.rest.readinto(buffer)
    n = min(len(buffer), len(self.head))
    buffer[:n], self.head = self.head[:n], self.head[n:]
    return n


def _parse_rows(path: str, reader, num_classes: int) -> dict:
  header = next(reader, None)
  if header is None or [h.strip() for h in header] != HEADER:
    raise DataError(f"{path}:1: expected header {','.join(HEADER)!r}, found {header!r}")
  predictions = {}
  for row in reader:
    where = f"{path}:{reader.line_num}"
    if not row or (len(row) == 1 and not row[0].strip()):
      continue  # Blank line.
    if len(row) != 2 or not row[0]:
      raise DataError(f"{where}: expected 'VideoId,\"label score ...\"', found {row!r}")
    video_id = row[0]  # As written: predict writes ids with their spaces, as the files hold them.
    if video_id in predictions:
      raise DataError(f"{where}: video id {video_id!r} appears twice")
    predictions[video_id] = _parse_pairs(where, row[1], num_classes)
  return predictions


def _parse_pairs(where: str, text: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = text.split()
  if len(tokens) % 2:
    raise DataError(f"{where}: odd number of fields in {text!r}; expected 'label score' pairs")
  try:
    classes = [int(t) for t in tokens[0::2]]
    scores = [float(t) for t in tokens[1::2]]
  except ValueError as e:
    raise DataError(f"{where}: expected integer labels and numeric scores ({e})") from None
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise DataError(f"{where}: label {bad[0]} is outside [0, {num_classes}) (--num_classes)")
  if not all(math.isfinite(s) for s in scores):
    raise DataError(f"{where}: scores must be finite numbers, found {text!r}")
  if len(set(classes)) != len(classes):
    raise DataError(f"{where}: a label appears twice in {text!r}")
  classes_K, scores_K = np.array(classes, np.int32), np.array(scores, np.float32)
  order = np.lexsort((classes_K, -scores_K))  # Score descending, ties by class id, as on device.
  return classes_K[order], scores_K[order]


def summarize_predictions(
  predictions: list[tuple[np.ndarray, np.ndarray]],
  labels: list[list[int]],
  num_classes: int,
  top_k: int,
) -> dict[str, np.ndarray]:
  """The summary of metrics.summarize_batch, built from ranked (classes, scores) rows."""
  B, k = len(labels), min(top_k, num_classes)
  summary = {
    "top_scores": np.full((B, k), -np.inf, np.float32),  # -inf: empty slot.
    "top_classes": np.zeros((B, k), np.int32),
    "top_hits": np.zeros((B, k), bool),
    "num_positives": np.zeros(B, np.int32),
    "perr_hits": np.zeros(B, np.int32),
    "hit_at_1": np.zeros(B, bool),
  }
  labels_BxC = np.zeros((B, num_classes), bool)
  for row, ((classes_K, scores_K), label_ids) in enumerate(zip(predictions, labels, strict=True)):
    labels_BxC[row, label_ids] = True
    n = len(set(label_ids))
    hits_K = labels_BxC[row, classes_K]
    m = min(k, len(classes_K))
    summary["top_scores"][row, :m] = scores_K[:m]
    summary["top_classes"][row, :m] = classes_K[:m]
    summary["top_hits"][row, :m] = hits_K[:m]
    summary["num_positives"][row] = n
    summary["perr_hits"][row] = hits_K[:n].sum()  # Fewer than n pairs: the rest are no hits.
    summary["hit_at_1"][row] = hits_K[:1].any()
  summary["labels_packed"] = np.packbits(labels_BxC, axis=1)
  return summary


def score(
  predictions: dict[str, tuple[np.ndarray, np.ndarray]],
  labeled_videos: Iterable[tuple[str, list[int]]],
  num_classes: int,
  top_k: int,
) -> dict:
  """Metrics of `predictions` over every (id, labels) or (id, labels, file) video; unknown CSV
  ids raise DataError."""
  accumulator = MetricsAccumulator(num_classes, top_k)
  seen = {}
  for chunk in _chunks(_checked(labeled_videos, seen, num_classes), _CHUNK):
    rows = [predictions.get(video_id, _NO_PREDICTIONS) for video_id, _ in chunk]
    summary = summarize_predictions(rows, [ids for _, ids in chunk], num_classes, top_k)
    accumulator.add(summary, np.ones(len(chunk), np.float32))
  unknown = sorted(set(predictions) - seen.keys())
  if unknown:
    examples = ", ".join(repr(v) for v in unknown[:3])
    raise DataError(
      f"{len(unknown)} video ids in the predictions are not in the labels, e.g. {examples}"
    )
  result = accumulator.result()
  result.update(num_predicted=len(predictions), top_k=accumulator.top_k)
  return result


def _checked(labeled_videos, seen: dict, num_classes: int) -> Iterator[tuple[str, list[int]]]:
  """The (id, labels) videos, checked; `seen` maps each id to its file ('' where not given)."""
  for video_id, label_ids, *file in labeled_videos:
    file = file[0] if file else ""
    if not video_id:  # Each empty id would otherwise be reported as appearing twice.
      where = f"{file}: " if file else ""
      raise DataError(
        f"{where}a video in the labels has no id (its 'id' or 'video_id' is missing or empty)"
      )
    if video_id in seen:
      files = f"in {seen[video_id]} and in {file}" if seen[video_id] != file else f"in {file}"
      raise DataError(
        f"video id {video_id!r} appears twice in the labels" + (f" ({files})" if file else "")
      )
    bad = [c for c in label_ids if not 0 <= c < num_classes]
    if bad:
      raise DataError(
        f"video {video_id!r}: label {bad[0]} is outside [0, {num_classes}) (--num_classes)"
      )
    seen[video_id] = file
    yield video_id, list(label_ids)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  iterator = iter(items)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def score_files(predictions_path: str, labels_pattern: str, num_classes: int, top_k: int) -> dict:
  """Reads the CSV and the labels' tfrecords and scores them."""
  predictions = read_predictions(predictions_path, num_classes)  # Fails fast, before TensorFlow.
  from configs import default  # configs/ is not part of the mfb_jax package.
  from mfb_jax import input_pipeline  # Deferred: imports TensorFlow.

  config = default.get_config()
  config.data.num_classes = num_classes
  labeled_videos = input_pipeline.read_ids_and_labels(
    labels_pattern, config, "--num_classes", with_files=True
  )
  return score(predictions, labeled_videos, num_classes, top_k)


@contextlib.contextmanager
def _native_logs_off():
  """Standard error goes to /dev/null within: tf.data's C++ warnings as it stops at a corrupt file
  ("Local rendezvous is aborting ...") and the reader's note on its way to naming the file came
  before the one error line."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
  """Command line: prints the metrics as one JSON line; bad input gives one stderr line, exit 1."""
  parser = cli.ArgumentParser(prog="python -m mfb_jax.metrics", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--predictions", required=True, help="Kaggle-format CSV (VideoId,LabelConfidencePairs)."
  )
  parser.add_argument(
    "--labels", required=True, help="tfrecord glob(s) with the videos' labels, comma-separated."
  )
  parser.add_argument(
    "--num_classes", type=int, default=3862, help="3862 (2018 data) or 4716 (2017)."
  )
  parser.add_argument(
    "--top_k", type=int, default=20, help="Predictions per video in GAP (20 as on Kaggle)."
  )
  args = parser.parse_args(argv)
  if args.num_classes < 1 or args.top_k < 1:
    parser.error("--num_classes and --top_k must be positive")
  try:
    with _native_logs_off():
      result = score_files(args.predictions, args.labels, args.num_classes, args.top_k)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # A video id may hold "\n".
    return 1
  if result["num_predicted"] == 0:  # Valid (a submission without predictions), rarely meant.
    print(f"warning: {args.predictions} has no rows: every video scores 0", file=sys.stderr)
  print(json.dumps(result))
  return 0
