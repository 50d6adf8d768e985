"""The label vocabulary CSV (predict.vocabulary): what it refuses, and its size against the
model's classes."""

import pytest

from configs import default
from mfb_jax import config_checks, vocabulary
from mfb_jax.errors import ConfigError


def test_a_vocabulary_that_is_not_utf8_is_named(tmp_path):
  path = tmp_path / "vocab.csv"
  path.write_bytes("Index,Name\n0,Caf\xe9\n".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"vocab\.csv: not a UTF-8 text file"):
    vocabulary.load(str(path))
  with pytest.raises(ConfigError, match=f"vocabulary: {tmp_path} is a directory, not a vocab"):
    vocabulary.load(str(tmp_path))
  with pytest.raises(ConfigError, match="vocabulary: no such file "):
    vocabulary.load(str(tmp_path / "missing.csv"))


def test_a_vocabulary_naming_an_id_twice_or_a_negative_one_is_refused(tmp_path):
  # Both were read silently: the later name won, and -3 was warned about as a class count.
  path = tmp_path / "vocab.csv"
  path.write_text("label_id,label_name\n0,zero\n1,one\n0,dup\n")
  with pytest.raises(ConfigError, match=r"label id 0 named twice \('zero', then 'dup' in line 4\)"):
    vocabulary.load(str(path))
  path.write_text("label_id,label_name\n0,zero\n-3,neg\n")
  with pytest.raises(ConfigError, match=r"vocab\.csv: label id -3 in line 3 is negative$"):
    vocabulary.load(str(path))
  path.write_text("label_id,label_name\n0,zero\n3,three\n3,three\n")  # A repeated row: harmless.
  assert vocabulary.load(str(path)) == {0: "zero", 3: "three"}
  # Excel's "CSV UTF-8" starts with a byte-order mark: it was read into the first column's name
  # ("not a vocabulary CSV ... found \ufefflabel_id, label_name").
  path.write_bytes("\ufefflabel_id,label_name\n0,zéro\n".encode())
  assert vocabulary.load(str(path)) == {0: "zéro"}


def test_a_vocabulary_of_another_size_than_the_model_is_refused_or_warned_about(
  tmp_path, monkeypatch
):
  warnings = []
  monkeypatch.setattr(config_checks.logging, "warning", lambda *args: warnings.append(args))
  path = tmp_path / "vocab.csv"
  path.write_text("Index,Name\n" + "".join(f"{i},name {i}\n" for i in range(12)))
  config = default.get_config()
  config.data.update(predict_pattern="/data/test*", num_classes=12)
  config.eval.top_k = config.predict.top_k = 5
  config.predict.vocabulary = str(path)
  config_checks.validate(config, "predict")  # 12 names for 12 classes.
  assert warnings == []
  config.data.num_classes = 20  # Fewer names than classes (a 2017 model, the 2018 vocabulary).
  config_checks.validate(config, "predict")
  assert [w[2:] for w in warnings] == [(11, 20)]
  config.data.num_classes = 8  # Names beyond the model's classes (the other way round).
  with pytest.raises(ConfigError, match=r"names label id 11, but data.num_classes=8"):
    config_checks.validate(config, "predict")


def test_a_vocabulary_row_without_a_name_with_no_rows_or_at_an_unknown_url_is_one_line(tmp_path):
  # The first was read as the name "None"; the second ended with exit 1 and TensorFlow's text.
  path = tmp_path / "vocab.csv"
  path.write_text("label_id,label_name\n0,zero\n1\n")
  with pytest.raises(ConfigError, match=r"vocab\.csv: line 3 has no label_name for label 1$"):
    vocabulary.load(str(path))
  path.write_text("Index,Name,WikiUrl\n")  # A header only: warned about as 0 classes.
  with pytest.raises(ConfigError, match=r"vocab\.csv: a vocabulary CSV without labels \(a header"):
    vocabulary.load(str(path))
  with pytest.raises(
    ConfigError, match=r"^config.predict.vocabulary: cannot read foo://x/v.csv \("
  ):
    vocabulary.load("foo://x/v.csv")
