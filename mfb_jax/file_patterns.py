"""The data patterns' syntax (data.train_pattern, eval_pattern, predict_pattern, the sweep's
flags): globs separated by commas. Pure Python, so that the sweep checks them without TensorFlow."""

import re

# A glob's bracket expression, as glibc's fnmatch (tf.io.gfile.glob, gs:// included) reads it: a
# '[' not escaped by a backslash, an optional '!' or '^', a ']' taken literally when it comes
# first, then characters, classes such as '[:digit:]' and backslash-escaped characters ('\]' is
# a ']' inside) up to the closing ']'.
_BRACKET = re.compile(r"(?<!\\)\[[!^]?\]?(?:\[:[a-z]+:\]|\\.|[^\]])*\]")


def split(pattern: str) -> list[str]:
  """The globs of a comma-separated pattern, stripped, empty ones dropped. A comma inside a
  bracket expression belongs to it: '/d/part-[0,5]*' is one glob."""
  kept = {i for m in _BRACKET.finditer(pattern) for i in range(m.start(), m.end())}
  cuts = [i for i, char in enumerate(pattern) if char == "," and i not in kept]
  pieces = [pattern[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(pattern)], strict=True)]
  return [piece.strip() for piece in pieces if piece.strip()]
