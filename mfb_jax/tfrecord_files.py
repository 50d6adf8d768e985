"""How a tfrecord file is compressed (none, GZIP or ZLIB), told from its first bytes.

The official YouTube-8M shards are not compressed; other tools write compressed ones
(tf.io.TFRecordWriter(path, "GZIP"), Beam's WriteToTFRecord to a '.gz' name, TFDS options). The
input pipeline reads each file with the compression found here, so every kind just works.

An uncompressed file starts with a record header: the record's length (8 bytes, little-endian)
and the masked CRC32C of those 8 bytes. That header is checked first, because a length can
begin with the same bytes as a GZIP or ZLIB stream does; a stream counts only if its first
bytes decode. A file that matches none of the three is read as uncompressed, and the reader
then reports it as corrupt.
"""

import concurrent.futures
import os
import struct
import threading
import zlib
from collections.abc import Callable
from typing import TypeVar

import tensorflow as tf

from mfb_jax.errors import DataError

NONE, GZIP, ZLIB = "", "GZIP", "ZLIB"  # TFRecordDataset's compression_type values.
_WBITS = {GZIP: 16 + zlib.MAX_WBITS, ZLIB: zlib.MAX_WBITS}  # zlib's window bits for each.
_GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1, ID2, CM = deflate.
_HEADER_BYTES = 12
RECORD_FRAMING_BYTES = 16  # Per record besides its data: the 12-byte header, the data's CRC.
_HEAD_BYTES = 256  # Read from each file: the record header, or enough of a stream to decode.
_CRC_MASK_DELTA = 0xA282EAD8
_CHUNK_BYTES = 16 << 20  # Read and inflated at a time by inflated_length.
_THREADS = 16  # Concurrent header reads: many remote (gs://) files are many round trips.
T = TypeVar("T")


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected.
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`; for the few bytes of a header, so plain Python."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord format's masked CRC: rotated right by 15 bits, plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _inflates(head: bytes, wbits: int) -> bool:
  """The bytes start a stream that zlib decodes (with wbits: 31 GZIP, 15 ZLIB)."""
  try:
    zlib.decompressobj(wbits).decompress(head)
  except zlib.error:
    return False
  return True


def compression_of_header(head: bytes) -> str:
  """NONE, GZIP or ZLIB, from the first bytes of a file (_HEAD_BYTES of them, or all of a
  shorter file). A compressed stream is recognised only if its start decodes."""
  if len(head) >= _HEADER_BYTES:
    (crc,) = struct.unpack("<I", head[8:12])
    if crc == masked_crc32c(head[:8]):
      return NONE
  if head[:3] == _GZIP_MAGIC and _inflates(head, _WBITS[GZIP]):
    return GZIP
  # ZLIB (RFC 1950): method 8 (deflate), window at most 32K, and the 16-bit header divides by 31.
  if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7:
    if (head[0] << 8 | head[1]) % 31 == 0 and _inflates(head, _WBITS[ZLIB]):
      return ZLIB
  return NONE


def _ends_its_stream(whole: bytes, kind: str) -> bool:
  """The whole file is a complete GZIP or ZLIB stream (or starts with one)."""
  stream = zlib.decompressobj(_WBITS[kind])
  stream.decompress(whole)
  return stream.eof


def compression_type(path: str) -> str:
  """NONE, GZIP or ZLIB for the tfrecord file at `path` (local or any tf.io.gfile path). A short
  compressed file (read whole) that ends inside its stream raises DataError: cut within the first
  bytes, TensorFlow's reader took it for an empty file, and it was reported as holding no record."""
  with tf.io.gfile.GFile(path, "rb") as f:
    head = f.read(_HEAD_BYTES)
  kind = compression_of_header(head)
  if kind != NONE and len(head) < _HEAD_BYTES and not _ends_its_stream(head, kind):
    raise DataError(
      f"{path}: corrupt or truncated {kind}-compressed tfrecord file (its {len(head)} bytes end "
      "inside the compressed stream)"
    )
  return kind


def inflated_length(path: str, kind: str) -> int:
  """The bytes of records a GZIP or ZLIB file holds (every GZIP member; a ZLIB file's one
  stream), inflated 16 MB at a time. DataError where the file ends inside its stream, or where
  bytes follow a ZLIB stream: TensorFlow's reader stops at the first ZLIB stream's end, so the
  records of a second one (two ZLIB files joined with cat) were dropped without a word."""
  stream, total, read = zlib.decompressobj(_WBITS[kind]), 0, 0
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read(_CHUNK_BYTES)
    read += len(data)
    while data:
      if stream.eof:  # Another GZIP member follows (TensorFlow reads them all), or bytes follow.
        if kind == ZLIB:
          extra = len(data) + tf.io.gfile.stat(path).length - read
          raise DataError(
            f"{path}: {extra} bytes follow the end of its ZLIB stream, and TensorFlow's reader "
            "ignores them (ZLIB files joined with cat?): write the records as one stream"
          )
        stream = zlib.decompressobj(_WBITS[kind])
      try:
        total += len(stream.decompress(data, _CHUNK_BYTES))
        while stream.unconsumed_tail:
          total += len(stream.decompress(stream.unconsumed_tail, _CHUNK_BYTES))
      except zlib.error as e:
        raise DataError(f"{path}: corrupt {kind}-compressed tfrecord file ({e})") from None
      data = stream.unused_data if stream.eof else b""
      if not data:
        data = f.read(_CHUNK_BYTES)
        read += len(data)
  if not stream.eof:
    raise DataError(
      f"{path}: corrupt or truncated {kind}-compressed tfrecord file (it ends inside its "
      "compressed stream)"
    )
  return total


def compression_types(paths: list[str]) -> list[str]:
  """compression_type of each path, in order (the headers are read concurrently)."""
  return map_paths(compression_type, paths)


def map_paths(fn: Callable[[str], T], paths: list[str]) -> list[T]:
  """fn of each path, in order, called concurrently: on remote (gs://) files each call is a round
  trip. The first path (in order) whose call raises has its exception raised here."""
  if len(paths) <= 1:
    return [fn(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(_THREADS, len(paths))) as pool:
    return list(pool.map(fn, paths))


def unreadable_directory(glob: str) -> str:
  """' (directory D cannot be read ...)' where the fixed part of a local glob's directory, or a
  directory above it, cannot be read (a glob sees no files there, which TensorFlow does not tell
  apart from none), ' (D does not exist)' for the first of them that is missing, else ''. A
  leading '~' is the home directory, as input_files.globbed reads it."""
  if "://" in glob:
    return ""
  fixed = os.path.dirname(os.path.abspath(os.path.expanduser(glob)))
  while any(c in fixed for c in "*?["):
    fixed = os.path.dirname(fixed)
  chain = [fixed]
  while os.path.dirname(chain[-1]) != chain[-1]:
    chain.append(os.path.dirname(chain[-1]))
  for directory in reversed(chain):  # From the root down: each must be searchable.
    if not os.path.isdir(directory):
      what = "is not a directory" if os.path.exists(directory) else "does not exist"
      return f" ({os.path.normpath(directory)} {what})"
    if not os.access(directory, os.X_OK | (os.R_OK if directory == fixed else 0)):
      return f" (directory {directory} cannot be read: permission denied)"
  return ""


class FileEnds:
  """Checks that each file read in order ends where its last record does.

  TensorFlow's reader takes a file cut inside a record's 12-byte header for one that ends there,
  and drops that record without a word. Where files are read once, in order (evaluation,
  prediction, scoring), the batches carry each record's file and size: once a file's records
  are past, their sizes and framing must add up to the file's length, a compressed file's once
  inflated (inflated_length: a second read of a compressed file, in a background thread started
  with its first record, so that it overlaps TensorFlow's reading; zlib releases the GIL).
  """

  def __init__(self, paths: list[str], lengths: list[int], types: list[str], last_whole=True):
    """last_whole: the last file read is read to its end (not when a reader stops early)."""
    self._lengths = {p: n for p, n, t in zip(paths, lengths, types, strict=True) if t == NONE}
    self._compressed = {p: t for p, t in zip(paths, types, strict=True) if t != NONE}
    self._inflating: _InBackground | None = None
    self._last_whole = last_whole
    self._path, self._end = "", 0

  def add(self, paths_B, sizes_B) -> None:
    """Records in reading order: their file names (bytes or str; '' for padding) and sizes."""
    for path, size in zip(paths_B, sizes_B, strict=True):
      path = path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)
      if not path:
        continue
      if path != self._path:
        self._check()
        self._path, self._end = path, 0
        kind = self._compressed.get(path)
        inflate = lambda p=path, k=kind: inflated_length(p, k)
        self._inflating = _InBackground(inflate) if kind else None
      self._end += int(size) + RECORD_FRAMING_BYTES

  def finish(self) -> None:
    """At the end of the data."""
    if self._last_whole:
      self._check()

  def _check(self) -> None:
    length = self._lengths.get(self._path)
    inflated = ""
    if self._inflating:  # This file is compressed.
      length, inflated = self._inflating.result(), " inflated"
    if length is not None and self._end < length:
      raise DataError(
        f"{self._path}: truncated tfrecord file (its records end at byte {self._end} of its "
        f"{length}{inflated} bytes; cut short, or followed by other bytes?)"
      )
    if length is not None and self._end > length:
      raise DataError(
        f"{self._path}: its records end at byte {self._end}, after the {length} bytes it had "
        "when listed: was it written to while being read?"
      )


class _InBackground:
  """fn() in a daemon thread (the interpreter's exit does not wait for it); result() waits for
  it and returns its value or raises its exception."""

  def __init__(self, fn: Callable[[], T]):
    self._done, self._outcome = threading.Event(), None
    threading.Thread(target=self._run, args=(fn,), daemon=True).start()

  def _run(self, fn) -> None:
    try:
      self._outcome = (True, fn())
    except Exception as e:  # noqa: BLE001 - raised again in the waiting thread.
      self._outcome = (False, e)
    self._done.set()

  def result(self):
    self._done.wait()
    ok, value = self._outcome
    if not ok:
      raise value
    return value


def without_aliases(files: list[str]) -> list[str]:
  """The files, each once: local paths naming the same file (`d/../d/f`, a symlink) count once,
  under the first spelling (read twice, its videos would count twice in GAP)."""
  seen, unique = set(), []
  for path in files:
    key = path if "://" in path else os.path.realpath(path)
    if key not in seen:
      seen.add(key)
      unique.append(path)
  return unique
