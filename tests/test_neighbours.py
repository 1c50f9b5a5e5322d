"""Neighbours: exact top-K, same-document exclusion, continuations, manifests, resume."""

from __future__ import annotations

import random

import numpy as np
import pytest

import configs
from common import artifacts
from common.errors import UserError
from data import dataset
from retrieval import neighbours
from retrieval import index as index_lib

M = 4  # chunk size of the synthetic splits (the code takes it from the split)
K = 2


def _split(name: str, doc_ids: list[str], seed: int, seq_len: int = 2 * M) -> dataset.TokenSplit:
  """A packed split: each document 3..13 random tokens (ids 2..49) then EOS (1)."""
  rng = np.random.default_rng(seed)
  parts = [np.append(rng.integers(2, 50, rng.integers(3, 14)), 1) for _ in doc_ids]
  token_doc = np.repeat(np.arange(len(parts)), [len(p) for p in parts]).astype(np.int32)
  return dataset.TokenSplit(name=name, tokens=np.concatenate(parts).astype(np.int32),
                            token_doc=token_doc, doc_ids=doc_ids, seq_len=seq_len, chunk_size=M)


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world():
  """A datastore (= train split), a validation split sharing one doc id, embeddings, index."""
  rng = np.random.default_rng(0)
  store = _split("train", [f"d{i}" for i in range(12)], seed=1)
  val = _split("validation", ["v0", "d3", "v1", "v2"], seed=2)  # "d3" also in the datastore
  store_NxE = _unit(rng, store.num_chunks)
  val_NxE = _unit(rng, val.num_chunks)
  index = index_lib.build_index(store_NxE, "ip", "Flat")
  return store, val, store_NxE, val_NxE, index


def _brute_force(split, queries_NxE, store, store_NxE, k):
  """Per query chunk: the k best datastore chunks of documents other than the excluded ones."""
  T = len(split.tokens)
  ids, dists = [], []
  for i in range(split.num_sequences * split.seq_len // M):
    banned = {split.doc_ids[split.token_doc[i * M]],
              split.doc_ids[split.token_doc[min(i * M + 2 * M, T - 1)]]}
    scores = store_NxE @ queries_NxE[i]
    allowed = [j for j in np.argsort(-scores) if store.doc_ids[store.chunk_doc()[j]] not in banned]
    ids.append(allowed[:k])
    dists.append(scores[allowed[:k]])
  return np.array(ids), np.array(dists)


@pytest.mark.parametrize("which", ["train", "validation"])
def test_flat_neighbours_equal_brute_force(world, tmp_path, which):
  store, val, store_NxE, val_NxE, index = world
  split, q_NxE = (store, store_NxE) if which == "train" else (val, val_NxE)
  out = neighbours.retro_split(tmp_path, q_NxE, split, store, index, K, overfetch=100,
                               metric="ip")
  want_ids, want_dists = _brute_force(split, q_NxE, store, store_NxE, K)
  C = split.seq_len // M
  assert out["neighbours"].shape == (split.num_sequences, C, K, 2 * M)
  assert out["neighbours"].dtype == np.int32
  np.testing.assert_array_equal(out["neighbour_ids"].reshape(-1, K), want_ids)
  np.testing.assert_allclose(out["neighbour_dists"].reshape(-1, K), want_dists, rtol=1e-5)
  assert isinstance(np.load(tmp_path / "neighbours.npy", mmap_mode="r"), np.memmap)


def test_no_neighbour_from_the_query_document(world, tmp_path):
  store, val, _, val_NxE, index = world
  out = neighbours.retro_split(tmp_path, val_NxE, val, store, index, K, overfetch=2, metric="ip")
  ids_QxK = np.asarray(out["neighbour_ids"]).reshape(-1, K)
  query_doc = np.array(val.doc_ids)[val.chunk_doc()[:len(ids_QxK)]]
  nbr_doc = np.where(ids_QxK >= 0, np.array(store.doc_ids)[store.chunk_doc()[ids_QxK]], "")
  assert (query_doc == "d3").any()  # the shared doc id is queried...
  assert not (nbr_doc == query_doc[:, None]).any()  # ...and never retrieved for itself
  missing = ids_QxK < 0  # over-fetch 2*K may leave rows short: those are all padding
  assert np.all(np.isinf(out["neighbour_dists"].reshape(-1, K)[missing]))
  assert not np.asarray(out["neighbours"]).reshape(-1, K, 2 * M)[missing].any()


def test_exclusion_fills_with_minus_one():
  ids_QxF = np.array([[5, 6, 7, -1], [8, 9, 5, 6]])
  dists_QxF = np.array([[0.1, 0.2, 0.3, 9.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
  chunk_doc_N = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3])
  docs_QxJ = np.array([[1, 1], [3, -1]])
  ids, dists = neighbours.exclude_same_document(ids_QxF, dists_QxF, docs_QxJ, chunk_doc_N, 2, "l2")
  np.testing.assert_array_equal(ids, [[7, -1], [5, 6]])
  np.testing.assert_array_equal(dists, np.array([[0.3, np.inf], [0.3, 0.4]], np.float32))


def test_continuations_follow_their_chunk_in_the_same_document(world, tmp_path):
  store, val, _, val_NxE, index = world
  out = neighbours.retro_split(tmp_path, val_NxE, val, store, index, K, overfetch=100, metric="ip")
  nbr_QxKxR = np.asarray(out["neighbours"]).reshape(-1, K, 2 * M)
  ids_QxK = np.asarray(out["neighbour_ids"]).reshape(-1, K)
  tokens, token_doc = store.tokens, store.token_doc
  padded_somewhere = False
  for nbr_R, chunk in zip(nbr_QxKxR.reshape(-1, 2 * M), ids_QxK.reshape(-1)):
    window = np.arange(chunk * M, chunk * M + 2 * M)
    inside = window < len(tokens)
    same = inside & (token_doc[np.minimum(window, len(tokens) - 1)] == token_doc[chunk * M])
    np.testing.assert_array_equal(nbr_R[same], tokens[window[same]])  # the chunk, then what follows
    assert not nbr_R[~same].any()  # other documents / past the stream end: padding
    assert same[0] and np.all(np.diff(same.astype(int)) <= 0)  # one run from the chunk start
    padded_somewhere |= not same.all()
  assert padded_somewhere  # short documents: some continuations hit a document end


class _Interrupted(Exception):
  pass


def test_interrupted_build_resumes_to_the_same_result(world, tmp_path, monkeypatch):
  store, val, store_NxE, _, index = world
  monkeypatch.setattr(neighbours, "QUERY_CHUNKS_PER_SHARD", 4)  # 2 sequences per shard
  clean = neighbours.retro_split(tmp_path / "clean", store_NxE, store, store, index, K, 4, "ip")
  real_retrieve, calls, resuming = neighbours.retrieve, [], False

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and not resuming:
      raise _Interrupted  # killed in the middle of the third shard
    return real_retrieve(*args, **kwargs)

  monkeypatch.setattr(neighbours, "retrieve", flaky)
  with pytest.raises(_Interrupted):
    neighbours.retro_split(tmp_path / "resumed", store_NxE, store, store, index, K, 4, "ip")
  assert len(list((tmp_path / "resumed" / "shards").glob("*.done"))) == 2
  calls.clear()
  resuming = True
  resumed = neighbours.retro_split(tmp_path / "resumed", store_NxE, store, store, index, K, 4, "ip")
  shards = -(-store.num_sequences // 2)
  assert len(calls) == shards - 2  # only the unfinished shards were recomputed
  assert not (tmp_path / "resumed" / "shards").exists()
  for name in clean:
    np.testing.assert_array_equal(resumed[name], clean[name])


def _keys_fn(inputs_BxL: np.ndarray) -> np.ndarray:
  """Stand-in LM keys: a 6-dim code of the current token and the prefix sum (no ties)."""
  prefix_BxL = np.cumsum(inputs_BxL, axis=1)
  return np.stack([np.sin(inputs_BxL * (d + 1) * 0.37) for d in range(3)]
                  + [np.sin(prefix_BxL * (d + 1) * 0.011) for d in range(3)], axis=-1) * 3


def test_knn_datastore_search_manifest_and_staleness(tmp_path):
  split = _split("train", [f"d{i}" for i in range(6)], seed=3)
  built = neighbours.build_knn_datastore(_keys_fn, split, tmp_path / "knn", {"model": "ckpt-a"},
                                         batch_size=3, index_spec="Flat")
  n = split.num_sequences * split.seq_len
  assert built.keys.dtype == np.float16 and built.keys.shape == (n, 6)
  np.testing.assert_array_equal(built.values, split.tokens[1:n + 1])
  q_NxD = _keys_fn(split.tokens[:n].reshape(-1, split.seq_len)).reshape(n, 6)
  for exact in (False, True):
    dists_NxK, tokens_NxK = built.search(q_NxD, 1, exact=exact)
    np.testing.assert_array_equal(tokens_NxK[:, 0], built.values[np.argmin(  # the nearest key's
        ((q_NxD[:, None] - np.asarray(built.keys, np.float32)[None]) ** 2).sum(-1), axis=1)])
    assert np.all(dists_NxK[:, 0] < 1e-3)  # each query is (up to fp16) one of the keys
  same = neighbours.KnnDatastore.load(tmp_path / "knn", {"model": "ckpt-a"}, "rebuild it")
  np.testing.assert_array_equal(same.values, built.values)
  with pytest.raises(UserError) as err:
    neighbours.KnnDatastore.load(tmp_path / "knn", {"model": "ckpt-b"},
                                 "delete it and rerun eval.py")
  msg = str(err.value)
  assert "\n" not in msg and "stale knn_datastore" in msg and "model=ckpt-a" in msg
  assert "model=ckpt-b" in msg and "delete it and rerun eval.py" in msg


def test_retrieved_manifest_mismatch_is_one_line(world, tmp_path):
  store, _, store_NxE, _, index = world
  final = tmp_path / "retro"
  with artifacts.building(final) as work:
    neighbours.retro_split(work / "train", store_NxE, store, store, index, K, 4, "ip")
    artifacts.write_manifest(work, neighbours.RETRO, {"embedder": "e1", "datastore": "s1"})
  got = neighbours.load_retrieved(final, {"embedder": "e1", "datastore": "s1"}, "rebuild")
  batch = got.batch("train", np.array([1, -1]))
  np.testing.assert_array_equal(batch["neighbours"][0], got.arrays["train"]["neighbours"][1])
  assert not batch["neighbours"][1].any()
  with pytest.raises(UserError, match=r"^stale retro_neighbours at .*embedder=e1.*embedder=e2; "
                                      r"python -m retrieval.build$"):
    neighbours.load_retrieved(final, {"embedder": "e2", "datastore": "s1"},
                              "python -m retrieval.build")


def _bag_of_tokens(chunks_Bxm: np.ndarray) -> np.ndarray:
  """A deterministic 'encoder': normalised token counts (all-zero rows stay zero)."""
  counts = np.zeros((len(chunks_Bxm), 50), np.float32)
  np.add.at(counts, (np.arange(len(chunks_Bxm))[:, None], chunks_Bxm), 1.0)
  counts[:, 0] = 0
  return counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-6)


def test_realm_refresh_candidates(world):
  store, val, _, _, _ = world
  calls = []

  bags_NxE = _bag_of_tokens(store.chunk_tokens())
  stale_NxE = np.random.default_rng(0).normal(size=bags_NxE.shape).astype(np.float32)

  def embed_docs(chunks_Bxm, stale_BxE):
    calls.append((chunks_Bxm.shape, stale_BxE.shape))
    return _bag_of_tokens(chunks_Bxm) + 0.0 * stale_BxE

  out = neighbours.refresh(embed_docs, _bag_of_tokens, store, stale_NxE, {"validation": val},
                           3, overfetch=100, index_spec="Flat", batch_size=16)
  assert set(calls) == {((16, M), (16, bags_NxE.shape[1]))}  # fixed shapes for a jitted encoder
  arrays = out.arrays["validation"]
  S, L = val.num_sequences, val.seq_len
  doc_NxE = bags_NxE
  for s in range(S):
    q_E = _bag_of_tokens(val.tokens[s * L:s * L + M][None])[0]
    banned = {val.doc_ids[val.token_doc[s * L]], val.doc_ids[val.token_doc[s * L + L]]}
    scores = doc_NxE @ q_E
    allowed = [j for j in np.argsort(-scores, kind="stable")
               if store.doc_ids[store.chunk_doc()[j]] not in banned]
    np.testing.assert_allclose(arrays["candidate_scores"][s], scores[allowed[:3]], rtol=1e-5)
    ids = arrays["candidate_ids"][s]
    # the batch carries the candidates' stale embeddings: the model's encoder input
    np.testing.assert_allclose(arrays["candidate_embeddings"][s], stale_NxE[ids], atol=1e-6)
    for chunk, tokens in zip(ids, arrays["candidates"][s]):
      own = store.token_doc[chunk * M:chunk * M + M] == store.token_doc[chunk * M]
      np.testing.assert_array_equal(tokens, np.where(own, store.tokens[chunk * M:chunk * M + M], 0))
  batch = out.batch("validation", np.array([0]))
  assert set(batch) == {"candidates", "candidate_embeddings"}


WORDS = ("the king queen crown sword river castle night day fox dog brown quick lazy "
         "jumps over a of and to thee thou art hath doth").split()


@pytest.mark.slow
def test_build_cli_end_to_end(tmp_path, capsys):
  """Tiny real corpus, real embedder: build RETRO neighbours, reuse them, search text."""
  from retrieval import build, search
  rng = random.Random(0)
  for i in range(6):
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(30))
    (tmp_path / f"doc{i}.txt").write_text(f"Document {i}.\n{text}\n")
  args = ["--config", "tiny_retro", f"--config.data.corpus={tmp_path}/*.txt",
          f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.max_documents=0"]
  build.main(args)
  assert "retro_neighbours" in capsys.readouterr().out
  config = configs.load("tiny_retro", [a.removeprefix("--config.") for a in args[2:]])
  arts = build.build_all(config)  # cached now
  batch = arts.batch("train", np.array([0, 1]))
  assert batch["neighbours"].shape == (2, 2, K, 128)
  hits = search.search_text(config, "the king and queen", 3, arts.prepared)
  assert len(hits) == 3 and all(h.doc_id in arts.prepared.train.doc_ids for h in hits)


def test_continuation_coverage_counts_what_the_context_lacks():
  """One sequence of 3 chunks of 4: hand-counted fractions; the continuation as neighbour
  covers it fully; a shuffle keeps the lists, moved between chunks."""
  from retrieval import coverage

  seq = np.array([5, 6, 7, 8,  5, 9, 10, 11,  6, 12, 13, 0], np.int32)  # last token padding
  nbr = np.zeros((1, 3, 1, 4), np.int32)
  nbr[0, 0, 0] = [9, 10, 20, 0]  # chunk 1 = 5 9 10 11: 9, 10 found, both new
  nbr[0, 1, 0] = [6, 12, 13, 0]  # chunk 2 = 6 12 13 (pad): all found; 6 is in the context
  got = coverage.continuation_coverage(seq, nbr, seq_len=12, chunk_size=4)
  assert got["in_neighbours"] == pytest.approx((2 / 4 + 3 / 3) / 2)
  assert got["in_context"] == pytest.approx((1 / 4 + 1 / 3) / 2)  # 5, then 6
  assert got["new"] == pytest.approx((2 / 4 + 2 / 3) / 2)
  exact = nbr.copy()
  exact[0, 0, 0] = seq[4:8]
  assert coverage.continuation_coverage(seq, exact, 12, 4)["in_neighbours"] == 1.0
  many = np.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4)
  moved = coverage.shuffled(many, seed=1)
  assert sorted(map(tuple, moved.reshape(6, -1))) == sorted(map(tuple, many.reshape(6, -1)))
  assert not np.array_equal(moved, many)
