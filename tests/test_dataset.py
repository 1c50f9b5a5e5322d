"""Dataset: TFDS build, packed streams, batches, determinism, caching, bad inputs."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import configs
from common import artifacts
from common.errors import UserError
from data import corpora, dataset

WORDS = ("the king queen crown sword river castle night day fox dog brown quick lazy "
         "jumps over a of and to thee thou art hath doth").split()


def _corpus(folder: Path, num_docs: int, lines: int = 40) -> str:
  rng = random.Random(0)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(num_docs):
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines))
    (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n{text}\n")
  return f"{folder}/*.txt"


def _config(corpus: str, cache: str, *overrides: str):
  return configs.load("tiny_transformer", [f"data.corpus={corpus}", f"data.cache_dir={cache}",
                                           "data.max_documents=0", *overrides])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[str], dataset.Prepared]:
  """(config overrides, prepare() result) for a 10-document synthetic corpus."""
  root = tmp_path_factory.mktemp("data")
  overrides = [f"data.corpus={_corpus(root / 'corpus', 10)}",
               f"data.cache_dir={root / 'cache'}", "data.max_documents=0"]
  return overrides, dataset.prepare(configs.load("tiny_transformer", overrides))


def test_streams_pack_documents_with_eos(setup):
  overrides, prep = setup
  docs = corpora.load_corpus(overrides[0].removeprefix("data.corpus="))
  texts = {d.doc_id: d.text for d in docs}
  assert prep.names == ("train", "validation", "test")
  ids = [set(prep.split(name).doc_ids) for name in prep.names]
  assert all(a.isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1:])
  assert sorted(i for part in ids for i in part) == sorted(texts)
  for part in (prep.train, prep.validation, prep.test):
    tokens, token_doc = np.asarray(part.tokens), np.asarray(part.token_doc)
    assert tokens.dtype == np.int32 and token_doc.dtype == np.int32 and tokens.min() > 0
    ends = np.flatnonzero(tokens == prep.tokenizer.eos_id)
    assert len(ends) == len(part.doc_ids) and ends[-1] == len(tokens) - 1
    assert np.all(np.diff(token_doc) >= 0) and token_doc[-1] == len(part.doc_ids) - 1
    source = prep.documents(part.name)  # random access through the TFDS data source
    for k in (len(part.doc_ids) - 1, 0):
      segment = tokens[token_doc == k]
      assert source[k]["doc_id"].decode() == part.doc_ids[k]
      np.testing.assert_array_equal(source[k]["tokens"], segment[:-1])
      assert prep.tokenizer.decode(segment[:-1]) == texts[part.doc_ids[k]]


def test_tfds_documents_are_written_in_shards_of_bounded_size(setup, tmp_path, monkeypatch):
  """With a shard budget of 200 tokens the TFDS writer cuts each split at document
  boundaries into several array_record files, and the data source reads every document
  back in order: a split never has to fit in memory."""
  _, prep = setup
  monkeypatch.setattr(dataset, "SHARD_TOKENS", 200)
  out = dataset.write_documents(prep.directory, prep.names, tmp_path)
  assert len(list(out.glob("*-train.array_record-*"))) > 1
  source = dataset.tfds.builder_from_directory(out).as_data_source(split="train")
  part = prep.train
  assert len(source) == len(part.doc_ids)
  for k, doc_id in enumerate(part.doc_ids):
    assert source[k]["doc_id"].decode() == doc_id
    np.testing.assert_array_equal(source[k]["tokens"], part.tokens[part.token_doc == k][:-1])


def test_batches_and_chunks_line_up(setup):
  _, prep = setup
  part, L = prep.train, prep.train.seq_len
  C = L // part.chunk_size
  batch = part.batch([2, 0])
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (2, L)
  assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"][0], part.tokens[2 * L:3 * L])
  np.testing.assert_array_equal(batch["targets"][0], part.tokens[2 * L + 1:3 * L + 1])
  assert batch["weights"].min() == 1.0 and list(batch["index"]) == [2, 0]
  chunks, chunk_doc = part.chunk_tokens(), part.chunk_doc()
  assert chunks.shape == (part.num_tokens // 64, 64) and chunk_doc.shape == (len(chunks),)
  np.testing.assert_array_equal(chunks[2 * C:3 * C].reshape(-1), batch["inputs"][0])
  np.testing.assert_array_equal(chunk_doc, part.token_doc[::64][:len(chunks)])
  with pytest.raises(IndexError):
    part.batch([part.num_sequences])


def test_batch_indices_are_a_pure_function_of_seed_and_step():
  n, B = 10, 4
  first = dataset.batch_indices(n, B, seed=3, step=7)
  assert first.dtype == np.int64 and np.array_equal(first, dataset.batch_indices(n, B, 3, 7))
  assert not np.array_equal(first, dataset.batch_indices(n, B, 4, 7))
  stream = np.concatenate([dataset.batch_indices(n, B, 3, s) for s in range(5)])  # 2 epochs
  assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:])  # a new permutation every epoch


def test_same_batch_in_a_new_process(setup):
  overrides, prep = setup
  code = ("import hashlib, json, sys, configs; from data import dataset; "
          "p = dataset.prepare(configs.load('tiny_transformer', sys.argv[1:])); "
          "i = dataset.batch_indices(p.train.num_sequences, 2, 0, 5); "
          "b = p.train.batch(i); "
          "print(json.dumps([i.tolist(), hashlib.sha256(b['inputs'].tobytes()).hexdigest()]))")
  out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True,
                       text=True, check=True, cwd=Path(__file__).parent.parent).stdout
  idx, digest = json.loads(out.strip().splitlines()[-1])
  mine = dataset.batch_indices(prep.train.num_sequences, 2, 0, 5)
  assert idx == mine.tolist()
  assert digest == hashlib.sha256(prep.train.batch(mine)["inputs"].tobytes()).hexdigest()


def test_eval_indices_cover_once_with_padded_last_batch(setup):
  _, prep = setup
  assert [b.tolist() for b in dataset.eval_indices(10, 4)] == \
      [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
  batch = prep.validation.batch(np.array([0, -1]))
  assert batch["weights"][0].min() == 1.0
  assert not batch["inputs"][1].any() and not batch["weights"][1].any()


def test_second_prepare_reuses_every_cache(setup, capsys):
  overrides, prep = setup
  stamps = {p: p.stat().st_mtime_ns for p in prep.directory.rglob("*") if p.is_file()}
  again = dataset.prepare(configs.load("tiny_transformer", overrides))
  out = capsys.readouterr().out
  assert "reusing cached tokenizer" in out and "reusing cached dataset" in out
  assert "training" not in out and "building" not in out
  assert again.hashes == prep.hashes and again.directory == prep.directory
  assert {p: p.stat().st_mtime_ns for p in prep.directory.rglob("*") if p.is_file()} == stamps
  manifest = artifacts.read_manifest(prep.directory)
  assert manifest["inputs"] == {"corpus": prep.hashes["corpus"],
                                "tokenizer": prep.hashes["tokenizer"]}
  assert manifest["splits"]["train"]["tokens"] == prep.train.num_tokens


def test_interrupted_build_is_not_trusted(tmp_path, monkeypatch, capsys):
  cfg = _config(_corpus(tmp_path / "corpus", 4), str(tmp_path / "cache"))

  def fail(*args, **kwargs):
    raise RuntimeError("interrupted")

  monkeypatch.setattr(dataset, "pack", fail)
  with pytest.raises(RuntimeError, match="interrupted"):
    dataset.prepare(cfg)
  built = list((tmp_path / "cache" / "datasets").iterdir())
  assert [p.name.endswith(".partial") for p in built] == [True]
  monkeypatch.undo()
  prep = dataset.prepare(cfg)
  assert "building dataset" in capsys.readouterr().out
  assert artifacts.read_manifest(prep.directory) is not None


@pytest.mark.parametrize("overrides,expect", [
    (["data.seq_len=100"], r"data.seq_len=100 is not a positive multiple of the chunk size "
                           r"64; set --config.data.seq_len=128"),
    (["data.seq_len=4096"], r"split of corpus .* has \d+ tokens, fewer than one sequence of "
                            r"data.seq_len\+1=4097; lower --config.data.seq_len"),
    (["data.max_documents=1"], r"has 1 document\(s\); at least 3 are needed .*test_fraction=0"),
])
def test_bad_inputs_raise_user_errors(tmp_path, overrides, expect):
  corpus = _corpus(tmp_path / "corpus", 3)
  with pytest.raises(UserError, match=expect) as err:  # seq_len: already by configs.load
    dataset.prepare(_config(corpus, str(tmp_path / "cache"), *overrides))
  assert "\n" not in str(err.value)


def test_bad_corpus_inputs_raise_user_errors(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
  with pytest.raises(UserError, match=r"bad.txt is not UTF-8 \(byte 0xff at offset 3\)"):
    dataset.prepare(_config(str(tmp_path / "bad.txt"), str(tmp_path / "cache")))
  with pytest.raises(UserError, match="no files match"):
    dataset.prepare(_config(str(tmp_path / "missing/*.txt"), str(tmp_path / "cache")))
  assert not (tmp_path / "cache" / "datasets").exists()
