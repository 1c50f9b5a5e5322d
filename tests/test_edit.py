"""Datastore editing without retraining (retrieval.edit): an edited version equals a fresh
build of the edited corpus array for array (Flat index), a removed document is gone from
every array a model reads, from search results and from the kNN-LM datastore, and the old
version stays usable. Hashed-trigram embeddings keep it fast; eval.py --without on trained
models is in tests/test_train_eval.py, generation citations in tests/test_generate.py."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

import configs
import synthetic
from common.errors import UserError
from data import dataset
from retrieval import build, datastore, edit, knn_datastore, search
from retrieval import index as index_lib

EMBEDDER = ["retrieval.embedder=hashing:384", "retrieval.index=Flat"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
  """An LM corpus, and datastore documents a, b, c (store/), d (extra/), and the edited
  corpus a, c, d written out (fresh/) for the reference build."""
  root = tmp_path_factory.mktemp("edit")
  lm = synthetic.corpus_overrides(root / "lm", num_docs=6, words_per_doc=600, num_words=300,
                                  num_phrases=10)
  words = " ".join(Path(p).read_text() for p in sorted(glob.glob(lm[0].split("=", 1)[1])))
  words = words.split()
  # Each document: 4 passages of 100 words of the LM corpus, no passage in two documents.
  starts = np.random.default_rng(1).permutation(16).reshape(4, 4) * (len(words) // 16)
  for folder, names in (("store", "abc"), ("extra", "d")):
    (root / folder).mkdir()
    for name in names:
      text = " ".join(w for s in starts["abcd".index(name)] for w in words[s:s + 100])
      (root / folder / f"{name}.txt").write_text(f"{name.upper()}. {text}\n")
  (root / "fresh").mkdir()
  for name in "ac":
    shutil.copy(root / "store" / f"{name}.txt", root / "fresh")
  shutil.copy(root / "extra" / "d.txt", root / "fresh")
  return {"root": root, "lm": lm}


def _config(world: dict, name: str, cache: str, datastore_glob: str, *extra: str):
  return configs.load(name, [*world["lm"], *EMBEDDER, f"data.cache_dir={world['root'] / cache}",
                             f"retrieval.datastore={world['root'] / datastore_glob}",
                             "model.realm.embedding_dim=384", *extra])


def _edited(world: dict, name: str):
  """(parent artifacts, edited version, its artifacts, fresh artifacts) for config `name`."""
  config = _config(world, name, "cache_edit", "store/*.txt")
  parent = build.build_all(config)
  version = edit.edit_datastore(config, parent.prepared, remove=["b"],
                                add=str(world["root"] / "extra" / "*.txt"))
  config.retrieval.datastore = str(version.directory)
  edited = build.build_all(config)
  fresh = build.build_all(_config(world, name, "cache_fresh", "fresh/*.txt"))
  return parent, version, edited, fresh


@pytest.mark.parametrize("name", ["tiny_retro", "tiny_realm", "tiny_incontext"])
def test_edited_version_equals_a_fresh_build(world, name):
  parent, version, edited, fresh = _edited(world, name)
  assert edited.retrieved.manifest["patched_from"]  # rows were copied, not all searched again
  patched = edited.retrieved.manifest["timings"]["patched_rows"]
  rows = sum(edited.prepared.split(s).num_sequences for s in edited.prepared.names)
  assert 0 < patched < rows, (patched, rows)
  # The datastore: the same streams, ids and content hash (its version).
  a, b = edited.datastore.split, fresh.datastore.split
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.token_doc, b.token_doc)
  assert a.doc_ids == b.doc_ids == ["a", "c", "d"]
  assert edited.datastore.hash == fresh.datastore.hash == version.hash
  assert [e["removed"] for e in version.edits] == [["b"]]
  # Embeddings and index vectors.
  emb = [datastore.datastore_embeddings(c, arts.prepared, arts.datastore)
         for c, arts in ((_config(world, name, "cache_edit", "store/*.txt",
                                  f"retrieval.datastore={version.directory}"), edited),
                         (_config(world, name, "cache_fresh", "fresh/*.txt"), fresh))]
  np.testing.assert_array_equal(*emb)
  # Every retrieval array the model reads.
  for split in edited.prepared.names:
    got, want = edited.retrieved.arrays[split], fresh.retrieved.arrays[split]
    assert sorted(got) == sorted(want)
    for key in want:
      g, w = np.asarray(got[key]), np.asarray(want[key])
      assert g.dtype == w.dtype and g.shape == w.shape, key
      if np.issubdtype(w.dtype, np.floating):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{split}/{key}")
      else:
        np.testing.assert_array_equal(g, w, err_msg=f"{split}/{key}")
  # The old version is still usable, with its own arrays.
  old = datastore.load_datastore(_config(world, name, "cache_edit", "store/*.txt"),
                                 parent.prepared)
  assert old.hash == parent.datastore.hash and "b" in old.split.doc_ids


def _rows(a_NxM: np.ndarray) -> set[bytes]:
  return {np.ascontiguousarray(r, np.int32).tobytes() for r in a_NxM}


def test_removed_document_is_gone_from_every_array(world):
  """After removing b: no id, token window, candidate, vector or search hit of it."""
  for name in ("tiny_retro", "tiny_realm"):
    parent, version, edited, _ = _edited(world, name)
    old = parent.datastore.split
    b = old.doc_ids.index("b")
    b_chunks_Nxm = np.asarray(old.chunk_tokens())[np.asarray(old.chunk_doc()) == b]
    assert len(b_chunks_Nxm) and not _rows(b_chunks_Nxm) & _rows(
        np.asarray(old.chunk_tokens())[np.asarray(old.chunk_doc()) != b])
    store = version.split
    assert "b" not in store.doc_ids
    assert not _rows(store.chunk_tokens()) & _rows(b_chunks_Nxm)
    assert datastore.leakage(store, dataset.TokenSplit(
        "b", np.asarray(b_chunks_Nxm).reshape(-1), np.zeros(b_chunks_Nxm.size, np.int32), ["b"],
        old.seq_len, old.chunk_size))["verbatim_chunks"] == 0
    ids_key = "neighbour_ids" if name == "tiny_retro" else "candidate_ids"
    m = store.chunk_size
    b_vecs = _rows(np.asarray(datastore.datastore_embeddings(
        _config(world, name, "cache_edit", "store/*.txt"), parent.prepared,
        parent.datastore))[np.asarray(old.chunk_doc()) == b].view(np.int32))
    for split in edited.prepared.names:
      before = parent.retrieved.arrays[split]
      after = edited.retrieved.arrays[split]
      old_ids = np.asarray(before[ids_key])
      assert np.isin(old_ids, np.flatnonzero(np.asarray(old.chunk_doc()) == b)).any()
      ids = np.asarray(after[ids_key])
      assert ids.max() < store.num_chunks
      tokens = np.asarray(after["neighbours" if "neighbours" in after else "candidates"])
      windows = tokens.reshape(-1, tokens.shape[-1])
      for start in range(0, tokens.shape[-1], m):
        assert not _rows(windows[:, start:start + m]) & _rows(b_chunks_Nxm)
      if "candidate_embeddings" in after:
        vecs = np.asarray(after["candidate_embeddings"], np.float32)
        assert not _rows(vecs.reshape(-1, vecs.shape[-1]).view(np.int32)) & b_vecs
  config = _config(world, "tiny_retro", "cache_edit", "store/*.txt",
                   f"retrieval.datastore={version.directory}")
  text = (world["root"] / "store" / "b.txt").read_text()[:300]
  hits = search.search_text(config, text, 5, edited.prepared)
  assert hits and all(h.doc_id != "b" for h in hits)
  parent_config = _config(world, "tiny_retro", "cache_edit", "store/*.txt")
  assert search.search_text(parent_config, text, 1, parent.prepared)[0].doc_id == "b"


def test_edit_errors_and_cli(world, capsys):
  config = _config(world, "tiny_retro", "cache_edit", "store/*.txt")
  prepared = dataset.prepare(config)
  with pytest.raises(UserError, match="'nope' matches no document"):
    edit.edit_datastore(config, prepared, remove=["nope"])
  with pytest.raises(UserError, match="nothing to edit"):
    edit.edit_datastore(config, prepared)
  with pytest.raises(UserError, match="already in the datastore"):
    edit.edit_datastore(config, prepared, add=str(world["root"] / "store" / "a.txt"))
  with pytest.raises(UserError, match="every document"):
    edit.edit_datastore(config, prepared, remove=["*"])
  ids_file = world["root"] / "opt_out.txt"
  ids_file.write_text("# publisher opt-out\nc\n")
  args = ["--config", "tiny_retro", *(f"--config.{o}" for o in
                                      [*world["lm"], *EMBEDDER, "model.realm.embedding_dim=384",
                                       f"data.cache_dir={world['root'] / 'cache_edit'}",
                                       f"retrieval.datastore={world['root'] / 'store/*.txt'}"])]
  edit.main([*args, "--list"])
  listing = capsys.readouterr().out
  assert [line.split()[0] for line in listing.splitlines() if "chunks" in line] == list("abc")
  version = edit.main([*args, "--remove", f"@{ids_file}"])
  out = capsys.readouterr().out
  assert version.split.doc_ids == ["a", "b"] and f"datastore={version.directory}" in out
  # An edit of an edit logs both; the training split's documents are editable too.
  twice = edit.edit_datastore(config, prepared, remove=["a"], parent=str(version.directory))
  assert [e["removed"] for e in twice.edits] == [["c"], ["a"]]
  config.retrieval.datastore = ""
  train_docs = edit.edit_datastore(config, prepared, remove=[prepared.train.doc_ids[0]])
  assert sorted(train_docs.split.doc_ids) == sorted(prepared.train.doc_ids[1:])


def _keys_fn(inputs_BxL: np.ndarray) -> np.ndarray:
  """Keys that see their context: the running sum of the inputs so far, and the input."""
  x = np.asarray(inputs_BxL, np.float32)
  return np.stack([np.cumsum(x, axis=1), x], axis=-1)


def test_knn_datastore_without_a_document(world, tmp_path):
  """Every entry whose next token or context is the removed document's goes; the rest stay
  with their keys, values and positions, and the index holds exactly them."""
  config = _config(world, "tiny_knnlm", "cache_edit", "store/*.txt")
  split = dataset.prepare(config).train
  full = knn_datastore.build_knn_datastore(_keys_fn, split, tmp_path / "knn", {"model": "m"},
                                           index_spec="Flat")
  gone = split.doc_ids[1]
  cut = knn_datastore.without(full, split, [gone])
  positions = knn_datastore.entry_positions(split)
  L = split.seq_len
  doc_T = np.asarray(split.token_doc)
  saw = np.array([(doc_T[(q - 1) // L * L:q + 1] == 1).any() for q in positions])
  assert saw.any() and not saw.all()
  np.testing.assert_array_equal(cut.positions, positions[~saw])
  np.testing.assert_array_equal(cut.keys, np.asarray(full.keys)[~saw])
  np.testing.assert_array_equal(cut.values, np.asarray(full.values)[~saw])
  assert cut.index.ntotal == len(cut.keys) == cut.manifest["entries"]
  assert cut.manifest["removed"] == [gone]
  np.testing.assert_array_equal(faiss.rev_swig_ptr(
      faiss.downcast_index(cut.index).get_xb(), cut.index.ntotal * cut.index.d).reshape(
          cut.index.ntotal, -1), np.asarray(cut.keys, np.float32))
  assert knn_datastore.without(full, split, [gone]).directory == cut.directory  # cached


def test_trained_index_is_refilled_not_retrained(world):
  """An IVF index of an edited version keeps its parent's centroids and holds exactly the
  edited version's vectors; its cache key names the parent index."""
  config = _config(world, "tiny_retro", "cache_ivf", "store/*.txt", "retrieval.index=IVF4,Flat")
  parent = build.build_all(config)
  version = edit.edit_datastore(config, parent.prepared, remove=["b"],
                                add=str(world["root"] / "extra" / "*.txt"))
  embedder = datastore.load_embedder(config)
  _, _, parent_index, parent_hash = datastore.store_vectors(config, parent.prepared,
                                                            parent.datastore, embedder)
  vectors_NxE, _, index, index_hash = datastore.store_vectors(config, parent.prepared, version,
                                                             embedder)
  ivf = lambda i: faiss.extract_index_ivf(i)  # noqa: E731
  np.testing.assert_array_equal(ivf(parent_index).quantizer.reconstruct_n(0, 4),
                                ivf(index).quantizer.reconstruct_n(0, 4))
  assert index.ntotal == version.split.num_chunks and index_hash != parent_hash
  ids = np.concatenate([faiss.rev_swig_ptr(ivf(index).invlists.get_ids(j),
                                           ivf(index).invlists.list_size(j))
                        for j in range(4)])
  assert sorted(ids) == list(range(len(vectors_NxE)))
  config.retrieval.datastore = str(version.directory)
  edited = build.build_all(config)  # its rows patched from the parent's
  assert edited.retrieved.manifest["patched_from"]
  assert np.asarray(edited.retrieved.arrays["train"]["neighbour_ids"]).max() < index.ntotal


@pytest.mark.parametrize("index", ["IVF4,Flat", "Flat"])
def test_an_append_indexes_only_the_new_chunks(world, index, monkeypatch):
  config = _config(world, "tiny_retro", "cache_append", "store/*.txt", f"retrieval.index={index}")
  parent = build.build_all(config)
  version = edit.edit_datastore(config, parent.prepared,
                                add=str(world["root"] / "extra" / "*.txt"))
  added, add = [], index_lib.add_vectors
  monkeypatch.setattr(index_lib, "add_vectors", lambda i, v: added.append(len(v)) or add(i, v))
  vectors_NxE, _, got, _ = datastore.store_vectors(config, parent.prepared, version,
                                                   datastore.load_embedder(config))
  assert added == [version.split.num_chunks - parent.datastore.split.num_chunks] != [0]
  assert got.ntotal == len(vectors_NxE) == version.split.num_chunks
  if index == "Flat":  # what a fresh build holds
    np.testing.assert_array_equal(got.reconstruct_n(0, got.ntotal), vectors_NxE)
