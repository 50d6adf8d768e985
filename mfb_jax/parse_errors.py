"""TensorFlow's record parse errors as one line naming the file and the video (or record).

TensorFlow's parse errors name the file at most; the video is found afterwards by parsing the
file's records one by one (first_failing_record: only after an error, so reading pays nothing).
"""

import re

import tensorflow as tf
from absl import logging

from mfb_jax import records, tfrecord_files

# TensorFlow's parse error for a feature of another value type, in its three wordings.
_TYPE_ERROR = re.compile(
  r"(?:Name: (?P<file>[^,]*), )?(?:Key|Feature list|Context feature|Feature): (?P<key>[^,\s]+?)"
  r"(?:, Index: \d+)?\. Data types don't match\. "
  r"(?:Data type: (?P<got0>\w+) but expected type|Expected type): (?P<want>\w+)"
  r"(?:, Actual type: (?P<got>\w+))?"
)
_COUNT_ERROR = re.compile(  # A frame (a FeatureList entry) with other than one value.
  r"(?:Name: (?P<file>[^,]*), )?Key: (?P<key>[^,\s]+), Index: (?P<index>\d+)\. "
  r"Number of values != expected\. values size: (?P<count>\d+)"
)
_PROTO_ERROR = re.compile(  # Frame-level (the file named) and video-level parsers' words.
  r"Invalid protocol message input, example id: (?P<file>.*?)\s*$|Could not parse example input"
)
# A frame whose Feature or BytesList holds a field TensorFlow's parser does not read.
_FRAME_ERROR = re.compile(r"Error in sequence feature (?P<key>\S+) in example (?P<file>.*?)\s*$")
# A fixed-size context feature (the id) present but holding no value.
_EMPTY_ERROR = re.compile(r"Unexpected number of elements in example (?P<file>.*?)\s*$")
_VALUE_TYPES = {"string": "bytes", "float": "floats", "int64": "int64 values"}
_FORMAT_HINTS = {  # For the official feature names: what the format stores there.
  ("string", "rgb"): " (frame-level: one uint8 string per frame, data.format='frame')",
  ("string", "audio"): " (frame-level: one uint8 string per frame, data.format='frame')",
  ("float", "mean_rgb"): " (video-level, data.format='video')",
  ("float", "mean_audio"): " (video-level, data.format='video')",
}
# What TensorFlow's parser reads otherwise than protobuf (README.md, "Formats").
_ENCODING = "written in an encoding that TensorFlow's parser does not read"


def _match(text: str) -> re.Match | None:
  for pattern in (_PROTO_ERROR, _FRAME_ERROR, _EMPTY_ERROR, _TYPE_ERROR, _COUNT_ERROR):
    if match := pattern.search(text):
      return match
  return None


def same_kind(text: str, other: str) -> bool:
  """Whether two parse errors' texts are of one kind (which feature a record's error names can
  differ from one parse to the next: TensorFlow checks a record's features in no fixed order)."""
  match, other_match = _match(text), _match(other)
  return match is not None and other_match is not None and match.re is other_match.re


def describe(text: str, path: str = "", locate=None) -> str | None:
  """One line for TensorFlow's record parse errors (None for other errors); `path` names the
  file (found by reading the files one by one) where TensorFlow's text does not. locate(file):
  (index, id) of the file's first record that fails with this error (first_failing_record),
  since TensorFlow's text names no record."""
  match = _match(text)
  if match is None:
    return None
  file = path or match["file"]
  index, video = locate(file) if file and locate is not None else (None, "")
  if video:
    where = f"{file}: video '{video}'"
  elif index is not None:
    where = f"{file}: record {index} (counting from 0)"
  elif match.re is _PROTO_ERROR:  # The line's subject: "F: a record does not parse as ...".
    where = f"{file}: a record" if file else "a record"
  else:
    where = file or "a record"
  if match.re is _PROTO_ERROR:
    return (
      f"{where} does not parse as a tf.train.SequenceExample or Example (not one, or {_ENCODING})"
    )
  if match.re is _FRAME_ERROR:
    key = match["key"]
    return (
      f"{where}: a frame of feature '{key}' is no Feature of one bytes value (or is {_ENCODING}?)"
    )
  if match.re is _EMPTY_ERROR:
    return f"{where}: the feature read as its id (data.id_feature) holds no value"
  if match.re is _COUNT_ERROR:
    return (
      f"{where}: frame {match['index']} of feature '{match['key']}' holds {match['count']} "
      "values; the official format has one bytes value per frame"
    )
  got = match["got"] or match["got0"]
  if got:
    got = f"holds {'bytes' if got == 'string' else got} values"
  else:
    got = f"has another value type (or is {_ENCODING}?)"
  key, want = match["key"], match["want"]
  expected = _VALUE_TYPES.get(want, want) + _FORMAT_HINTS.get((want, key), "")
  return f"{where}: feature '{key}' {got}; expected {expected}"


def first_failing_record(spec: records.RecordSpec, path: str, same_error) -> tuple[int | None, str]:
  """(index, id) of the first record of `path` whose parse by its format's per-record parser
  fails with an error for which same_error(error) holds: (None, '') if none does (the file
  changed since, or it cannot be read); its id is '' where it cannot be read."""
  from mfb_jax import frames  # noqa: PLC0415 - frames imports records, as this module does.

  frame_level = spec.format == "frame"
  parse = tf.function(  # The whole result, so that no check of the parser is pruned away.
    lambda record: (frames.parse_frame_record if frame_level else records.parse_video_record)(
      spec, path, record
    ),
    autograph=False,
  )
  ids = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in spec.id_keys}
  logging.warning("bad record: reading %s record by record to name its video", path)
  found = _first_failing(path, parse, same_error)
  if found is None:
    return None, ""
  index, record = found
  try:
    context, _, _ = tf.io.parse_sequence_example(record[None], context_features=ids)
    return index, records.id_text(records.video_ids(spec, context)[0].numpy())
  except tf.errors.OpError:  # Its id unreadable: the record is named by its place.
    return index, ""


def _first_failing(path: str, parse, same_error) -> tuple[int, tf.Tensor] | None:
  """(index, record) of the first record of `path` whose parse fails with same_error."""
  try:
    records_ds = tf.data.TFRecordDataset(path, tfrecord_files.compression_type(path))
    for index, record in enumerate(records_ds):
      try:
        parse(record)
      except tf.errors.InvalidArgumentError as e:
        if same_error(e):
          return index, record
  except tf.errors.OpError:  # The file gone since, or a corrupt record before a failing one.
    pass
  return None
