"""Neighbours: exact top-K, same-document exclusion, continuations, manifests, resume."""

from __future__ import annotations

import random

import numpy as np
import pytest

import configs
from common import artifacts
from common.errors import UserError
from data import dataset
from models.family import RetrievalSpec
from retrieval import candidates, core, knn_datastore, neighbours
from retrieval import index as index_lib

M = 4  # chunk size of the synthetic splits (the code takes it from the split)
K = 2
RETRO = RetrievalSpec(kind="neighbours", k=K, length=2 * M, batch_keys=("neighbours",),
                      stride=M, query_len=M)  # RETRO's request at chunk size M


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
  out = neighbours.neighbours_split(tmp_path, q_NxE, split, store, index, RETRO, overfetch=100,
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
  out = neighbours.neighbours_split(tmp_path, val_NxE, val, store, index, RETRO, overfetch=2,
                                    metric="ip")
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
  ids, dists = core.exclude_same_document(ids_QxF, dists_QxF, docs_QxJ, chunk_doc_N, 2, "l2")
  np.testing.assert_array_equal(ids, [[7, -1], [5, 6]])
  np.testing.assert_array_equal(dists, np.array([[0.3, np.inf], [0.3, 0.4]], np.float32))


def test_continuations_follow_their_chunk_in_the_same_document(world, tmp_path):
  store, val, _, val_NxE, index = world
  out = neighbours.neighbours_split(tmp_path, val_NxE, val, store, index, RETRO, overfetch=100,
                                    metric="ip")
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
  clean = neighbours.neighbours_split(tmp_path / "clean", store_NxE, store, store, index, RETRO,
                                      4, "ip")
  real_retrieve, calls, resuming = core.retrieve, [], False

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and not resuming:
      raise _Interrupted  # killed in the middle of the third shard
    return real_retrieve(*args, **kwargs)

  monkeypatch.setattr(core, "retrieve", flaky)
  with pytest.raises(_Interrupted):
    neighbours.neighbours_split(tmp_path / "resumed", store_NxE, store, store, index, RETRO, 4,
                                "ip")
  assert len(list((tmp_path / "resumed" / "shards").glob("*.done"))) == 2
  calls.clear()
  resuming = True
  resumed = neighbours.neighbours_split(tmp_path / "resumed", store_NxE, store, store, index,
                                        RETRO, 4, "ip")
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
  built = knn_datastore.build_knn_datastore(_keys_fn, split, tmp_path / "knn",
                                            {"model": "ckpt-a"}, batch_size=3, index_spec="Flat")
  n = split.num_sequences * split.seq_len
  assert built.keys.dtype == np.float16 and built.keys.shape == (n, 6)
  np.testing.assert_array_equal(built.values, split.tokens[1:n + 1])
  q_NxD = _keys_fn(split.tokens[:n].reshape(-1, split.seq_len)).reshape(n, 6)
  for exact in (False, True):
    dists_NxK, tokens_NxK = built.search(q_NxD, 1, exact=exact)
    np.testing.assert_array_equal(tokens_NxK[:, 0], built.values[np.argmin(  # the nearest key's
        ((q_NxD[:, None] - np.asarray(built.keys, np.float32)[None]) ** 2).sum(-1), axis=1)])
    assert np.all(dists_NxK[:, 0] < 1e-3)  # each query is (up to fp16) one of the keys
  same = knn_datastore.KnnDatastore.load(tmp_path / "knn", {"model": "ckpt-a"}, "rebuild it")
  np.testing.assert_array_equal(same.values, built.values)
  with pytest.raises(UserError) as err:
    knn_datastore.KnnDatastore.load(tmp_path / "knn", {"model": "ckpt-b"},
                                    "delete it and rerun eval.py")
  msg = str(err.value)
  assert "\n" not in msg and "stale knn_datastore" in msg and "model=ckpt-a" in msg
  assert "model=ckpt-b" in msg and "delete it and rerun eval.py" in msg


def test_retrieved_manifest_mismatch_is_one_line(world, tmp_path):
  store, _, store_NxE, _, index = world
  final = tmp_path / "retro"
  with artifacts.building(final) as work:
    neighbours.neighbours_split(work / "train", store_NxE, store, store, index, RETRO, 4, "ip")
    artifacts.write_manifest(work, neighbours.ARTIFACT, {"embedder": "e1", "datastore": "s1"})
  got = core.load_retrieved(final, {"embedder": "e1", "datastore": "s1"}, "rebuild",
                            RETRO.batch_keys)
  batch = got.batch("train", np.array([1, -1]))
  np.testing.assert_array_equal(batch["neighbours"][0], got.arrays["train"]["neighbours"][1])
  assert not batch["neighbours"][1].any()
  with pytest.raises(UserError, match=r"^stale retro_neighbours at .*embedder=e1.*embedder=e2; "
                                      r"python -m retrieval.build$"):
    core.load_retrieved(final, {"embedder": "e2", "datastore": "s1"},
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

  stale_queries_SxE = np.random.default_rng(1).normal(
      size=(val.num_sequences, bags_NxE.shape[1])).astype(np.float32)

  def embed(chunks_Bxm, stale_BxE):
    calls.append((chunks_Bxm.shape, stale_BxE.shape))
    return _bag_of_tokens(chunks_Bxm) + 0.0 * stale_BxE

  out = candidates.refresh(embed, embed, store, stale_NxE, {"validation": val},
                           {"validation": stale_queries_SxE}, 3, overfetch=100,
                           index_spec="Flat", batch_size=16)
  assert set(calls) == {((16, M), (16, bags_NxE.shape[1]))}  # fixed shapes for a jitted encoder
  arrays = out.arrays["validation"]
  np.testing.assert_array_equal(arrays["query_embedding"], stale_queries_SxE)  # kept stale
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
  assert set(batch) == {"candidates", "candidate_embeddings", "query_embedding"}
  first = out.first_k(2).arrays["validation"]  # the per-query vectors have no K axis to cut
  assert first["candidates"].shape[1] == 2
  np.testing.assert_array_equal(first["query_embedding"], stale_queries_SxE)


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


# --- generalised query windows (In-Context RALM: stride 32, query_len 64) ----------------------

def _long_split(name: str, doc_ids: list[str], seed: int, seq_len: int = 128,
                chunk_size: int = 64) -> dataset.TokenSplit:
  """A packed split of documents of 20..180 random tokens (ids 2..49) then EOS (1)."""
  rng = np.random.default_rng(seed)
  parts = [np.append(rng.integers(2, 50, rng.integers(20, 181)), 1) for _ in doc_ids]
  token_doc = np.repeat(np.arange(len(parts)), [len(p) for p in parts]).astype(np.int32)
  return dataset.TokenSplit(name=name, tokens=np.concatenate(parts).astype(np.int32),
                            token_doc=token_doc, doc_ids=doc_ids, seq_len=seq_len,
                            chunk_size=chunk_size)


def test_chunk_windows_request_is_the_retro_computation(world, tmp_path):
  """stride = query_len = chunk size: exactly RETRO's arrays, computed directly here (query
  chunk c of the stream, exclusion of tokens c*m and c*m + 2m, the chunk + 2m tokens)."""
  store, val, _, val_NxE, index = world
  out = neighbours.neighbours_split(tmp_path, val_NxE, val, store, index, RETRO, 3, "ip")
  C = val.seq_len // M
  rows = np.arange(val.num_sequences * C)
  docs_QxJ = core.query_docs(val.token_doc, core.doc_codes(val.doc_ids, store.doc_ids),
                             rows * M, rows * M + 2 * M)
  ids_QxK, dists_QxK = core.retrieve(index, val_NxE[rows], docs_QxJ, store.chunk_doc(), K, 3,
                                     "ip")
  nbr_QxKxR = core.chunk_windows(store.tokens, store.token_doc, ids_QxK, M, 2 * M)
  S = val.num_sequences
  for name, want in (("neighbours", nbr_QxKxR.reshape(S, C, K, 2 * M)),
                     ("neighbour_ids", ids_QxK.reshape(S, C, K)),
                     ("neighbour_dists", dists_QxK.reshape(S, C, K))):
    assert out[name].dtype == want.dtype
    np.testing.assert_array_equal(out[name], want)


def test_retro_request_reuses_chunk_embeddings(monkeypatch):
  """RETRO's windows are the split's chunks: their cached chunk embeddings are the queries
  and nothing is embedded again; other windows go through the window embeddings."""
  split = _long_split("validation", ["v0", "v1", "v2"], seed=5)
  chunks_NxE = np.arange(split.num_chunks * 2, dtype=np.float32).reshape(-1, 2)
  windows_SxWxE = np.ones((split.num_sequences, 4, 2), np.float32)
  calls = []
  monkeypatch.setattr(neighbours.datastore_lib, "chunk_embeddings",
                      lambda *a: calls.append("chunks") or (chunks_NxE, "h"))
  monkeypatch.setattr(neighbours, "window_embeddings",
                      lambda *a: calls.append(("windows", *a[-2:])) or windows_SxWxE)
  prepared = type("Prepared", (), {"tokenizer": None})()
  retro = RetrievalSpec("neighbours", 2, 128, ("neighbours",), stride=64, query_len=64)
  assert neighbours.queries(None, prepared, split, None, retro) is chunks_NxE
  assert calls == ["chunks"]
  ralm = RetrievalSpec("neighbours", 2, 96, ("neighbours",), stride=32, query_len=64)
  got = neighbours.queries(None, prepared, split, None, ralm)
  assert calls == ["chunks", ("windows", 32, 64)] and got.shape == (4 * split.num_sequences, 2)


class _Tok:
  hash = "tok"

  def decode(self, ids: list[int]) -> str:
    return " ".join(map(str, ids))


class _BagEmbedder:
  """Embeds "1 2 3"-texts (from _Tok) as normalised bags of tokens; records its texts."""
  hash, dim = "bag", 50

  def __init__(self):
    self.texts = []

  def embed_texts(self, texts, progress=None):
    self.texts += texts
    ids = [np.array(t.split(), np.int64) for t in texts]
    out = np.stack([_bag_of_tokens(np.array([i]))[0] for i in ids]) if ids else \
        np.zeros((0, self.dim), np.float32)
    if progress is not None:
      progress.update(len(texts))
    return out


def test_ralm_windows_are_clipped_and_exclude_the_query_documents(tmp_path):
  """stride 32, query_len 64 over sequences of 128: 4 windows per sequence; window 0 holds only
  the sequence's first 32 tokens (clipped, embedded without padding); each window's K
  neighbours are the brute-force best chunks of other documents than those of its first token
  and of token (i+2)*32; they are `length` tokens from the chunk start; the embeddings are
  cached by stride and query_len."""
  store = _long_split("train", [f"d{i}" for i in range(30)], seed=6)
  val = _long_split("validation", ["v0", "d3", "v1", "d8", "v2"], seed=7)
  store_NxE = _bag_of_tokens(store.chunk_tokens())
  index = index_lib.build_index(store_NxE, "ip", "Flat")
  config = configs.load("tiny_retro", [f"data.cache_dir={tmp_path / 'cache'}"])
  req = RetrievalSpec("neighbours", 3, 96, ("neighbours",), stride=32, query_len=64)
  emb = _BagEmbedder()
  q_SxWxE = neighbours.window_embeddings(config, val, _Tok(), emb, req.stride, req.query_len)
  S, L, W = val.num_sequences, val.seq_len, 4
  assert q_SxWxE.shape == (S, W, 50) and len(emb.texts) == S * W
  first_Q, end_Q = neighbours.query_windows(L, 32, 64, 0, S)
  np.testing.assert_array_equal(end_Q - first_Q, np.tile([32, 64, 64, 64], S))  # i=0 clipped
  for s in range(S):
    np.testing.assert_array_equal(emb.texts[s * W].split(),  # no padding in the query text
                                  list(map(str, val.tokens[s * L:s * L + 32])))
  assert neighbours.window_embeddings(config, val, _Tok(), emb, 32, 64) is not None
  assert len(emb.texts) == S * W  # cached: nothing embedded again
  neighbours.window_embeddings(config, val, _Tok(), emb, 32, 32)
  assert len(emb.texts) == 2 * S * W  # another query_len: other windows

  queries_NxE = np.asarray(q_SxWxE).reshape(S * W, -1)
  out = neighbours.neighbours_split(tmp_path / "nbrs", queries_NxE, val, store, index, req, 100,
                                    "ip")
  assert out["neighbours"].shape == (S, W, 3, 96) and out["neighbours"].dtype == np.int32
  assert out["neighbour_ids"].dtype == np.int64 and out["neighbour_dists"].dtype == np.float32
  ids_QxK = np.asarray(out["neighbour_ids"]).reshape(-1, 3)
  T = len(val.tokens)
  store_doc = np.array(store.doc_ids)[store.chunk_doc()]
  for q, (a, b) in enumerate(zip(first_Q, end_Q)):
    banned = {val.doc_ids[val.token_doc[a]], val.doc_ids[val.token_doc[min(b + 32, T - 1)]]}
    scores = store_NxE @ _bag_of_tokens(val.tokens[a:b][None])[0]
    allowed = [j for j in np.argsort(-scores, kind="stable") if store_doc[j] not in banned]
    np.testing.assert_allclose(out["neighbour_dists"].reshape(-1, 3)[q], scores[allowed[:3]],
                               rtol=1e-5)
    assert not banned & set(store_doc[ids_QxK[q]])  # never the query's documents
  assert {"d3", "d8"} <= {val.doc_ids[d] for d in val.token_doc[first_Q]}  # shared ids queried
  np.testing.assert_array_equal(out["neighbours"].reshape(-1, 3, 96),
                                core.chunk_windows(store.tokens, store.token_doc, ids_QxK, 64, 96))
