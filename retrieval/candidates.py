"""REALM candidates: K datastore chunks per sequence, queried by its first chunk, and the
stale-index refresh that recomputes them with new encoders.

    arrays = realm_split(directory, queries_SxE, split, store.split, store_NxE, index, k,
                         overfetch, metric)
    new = refresh(embed_docs, embed_queries, store.split, store_NxE, splits, queries, k)

Arrays per split: `candidate_ids` int64 [S, K] (-1 = none), `candidates` int32 [S, K, R]
(R tokens from each chunk's start, `core.chunk_windows`), `candidate_embeddings` float32
[S, K, E] (the chunk's embedding in the index the candidates were found with: the stale
vector the model's document encoder starts from), `candidate_scores` float32 [S, K],
`query_embedding` float32 [S, E] (the embedder's vector of the sequence's first chunk: the
query the search used, which the model's query encoder starts from).
Excluded are chunks of the documents of the sequence's first token and of the token after
its end. The artifact kind is "realm_candidates".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from common.errors import UserError
from data import dataset
from models import family
from retrieval import core
from retrieval import datastore as datastore_lib
from retrieval import embedder as embedder_lib
from retrieval import index as index_lib
from retrieval import shards

ARTIFACT = "realm_candidates"  # cache kind of every candidates artifact
IDS = "candidate_ids"  # the array whose -1 entries are unfilled candidates
SEQUENCES_PER_SHARD = 4096  # query sequences per resumable shard
QUERIES = "query_embedding"  # the array of the queries' stale vectors
REFRESH_BATCH_KEYS = ("candidates", "candidate_embeddings", QUERIES)  # refresh's default batch


def check(config: ml_collections.ConfigDict, request: family.RetrievalSpec,
          embedder: embedder_lib.Embedder) -> None:
  """UserError if the stale candidate vectors would not fit the model's input width."""
  if request.length < 1:
    raise UserError(f"the model requests candidates of length={request.length}; it must be "
                    f">= 1")
  if embedder.dim != config.model.realm.embedding_dim:
    raise UserError(f"the embedder {config.retrieval.embedder!r} makes {embedder.dim}-dim "
                    f"vectors but model.realm.embedding_dim={config.model.realm.embedding_dim}; "
                    f"set --config.model.realm.embedding_dim={embedder.dim}")


def queries(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
            split: dataset.TokenSplit, embedder: embedder_lib.Embedder,
            request: family.RetrievalSpec) -> np.ndarray:
  """float32 [S, E]: the embedding of every sequence's first chunk (cached chunk embeddings)."""
  C = split.seq_len // split.chunk_size
  chunks_NxE = datastore_lib.chunk_embeddings(config, split, prepared.tokenizer, embedder)[0]
  return chunks_NxE[:split.num_sequences * C:C]


def candidate_rows(queries_NxE: np.ndarray, split: dataset.TokenSplit,
                   store: dataset.TokenSplit, store_embeddings_NxE: np.ndarray, index, k: int,
                   overfetch: int, metric: str, timings: dict[str, float] | None = None,
                   length: int | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """rows(seq_S) -> the candidate arrays (`realm_split`) of the sequences seq_S."""
  L = split.seq_len
  length = store.chunk_size if length is None else length
  codes_D = core.doc_codes(split.doc_ids, store.doc_ids)
  chunk_doc_N = np.asarray(store.chunk_doc())
  timings = {} if timings is None else timings

  def rows(seq_S: np.ndarray) -> dict[str, np.ndarray]:
    seq_S = np.asarray(seq_S, np.int64)
    starts = seq_S * L
    queries_SxE = np.asarray(queries_NxE[seq_S], np.float32)
    t0 = time.perf_counter()
    ids_SxK, scores_SxK = core.retrieve(index, queries_SxE,
                                        core.query_docs(split.token_doc, codes_D, starts,
                                                        starts + L),
                                        chunk_doc_N, k, overfetch, metric)
    t1 = time.perf_counter()
    live_SxK = ids_SxK >= 0
    vecs_SxKxE = np.asarray(store_embeddings_NxE[np.where(live_SxK, ids_SxK, 0)])
    out = {"candidate_ids": ids_SxK,
           "candidates": core.chunk_windows(store.tokens, store.token_doc, ids_SxK,
                                            store.chunk_size, length),
           "candidate_embeddings": np.where(live_SxK[..., None], vecs_SxKxE, 0).astype(np.float32),
           "candidate_scores": scores_SxK,
           QUERIES: queries_SxE}
    timings["search_s"] = timings.get("search_s", 0.0) + t1 - t0
    timings["materialise_s"] = timings.get("materialise_s", 0.0) + time.perf_counter() - t1
    return out

  return rows


def realm_split(directory: Path, queries_NxE: np.ndarray, split: dataset.TokenSplit,
                store: dataset.TokenSplit, store_embeddings_NxE: np.ndarray, index, k: int,
                overfetch: int, metric: str, timings: dict[str, float] | None = None,
                length: int | None = None) -> dict[str, np.ndarray]:
  """REALM candidates of every sequence of `split`: the query is its first chunk.

  `queries_NxE` holds one query per sequence (row s = sequence s); `store_embeddings_NxE`
  the datastore chunk embeddings the index was built on (saved as stale candidate vectors);
  `length`: tokens per candidate (default: the chunk size).
  """
  rows = candidate_rows(queries_NxE, split, store, store_embeddings_NxE, index, k, overfetch,
                        metric, timings, length)
  return shards.sharded_rows(directory, split.num_sequences, SEQUENCES_PER_SHARD,
                             lambda s0, s1: rows(np.arange(s0, s1)),
                             desc=f"REALM candidates ({split.name})", unit="seq")


def rows(config: ml_collections.ConfigDict, request: family.RetrievalSpec,
         split: dataset.TokenSplit, queries_NxE: np.ndarray, store: datastore_lib.Datastore,
         store_NxE: np.ndarray, index, timings: dict[str, float]
         ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """The builder's row function (build.py, patch.py): `candidate_rows` with the config's
  settings."""
  r = config.retrieval
  return candidate_rows(queries_NxE, split, store.split, store_NxE, index, request.k,
                        r.overfetch, r.metric, timings, length=request.length)


def search(config: ml_collections.ConfigDict, request: family.RetrievalSpec, directory: Path,
           split: dataset.TokenSplit, queries_NxE: np.ndarray,
           store: datastore_lib.Datastore, store_NxE: np.ndarray, index,
           timings: dict[str, float]) -> dict[str, np.ndarray]:
  """The builder's search step (build.py): `realm_split` with the config's settings."""
  r = config.retrieval
  return realm_split(directory, queries_NxE, split, store.split, store_NxE, index, request.k,
                     r.overfetch, r.metric, timings, length=request.length)


# --- stale-index refresh ----------------------------------------------------------------------

def _embed_in_batches(fn: Callable[..., np.ndarray], arrays: Sequence[np.ndarray],
                      batch_size: int, desc: str) -> np.ndarray:
  """fn(*rows of arrays) over fixed-size batches (the last one zero-padded, so a jitted fn
  compiles once)."""
  n = len(arrays[0])
  out = None
  with tqdm(total=n, desc=desc, unit="chunk", unit_scale=True) as bar:
    for start in range(0, n, batch_size):
      parts = [np.asarray(a[start:start + batch_size]) for a in arrays]
      rows = [np.zeros((batch_size, *a.shape[1:]), a.dtype) for a in parts]
      for row, part in zip(rows, parts):
        row[:len(part)] = part
      vecs_BxE = np.asarray(fn(*rows), np.float32)[:len(parts[0])]
      if out is None:
        out = np.empty((n, vecs_BxE.shape[1]), np.float32)
      out[start:start + len(vecs_BxE)] = vecs_BxE
      bar.update(len(vecs_BxE))
  return out


def refresh(embed_docs: Callable[[np.ndarray, np.ndarray], np.ndarray],
            embed_queries: Callable[[np.ndarray, np.ndarray], np.ndarray],
            datastore: dataset.TokenSplit, stale_NxE: np.ndarray,
            splits: Mapping[str, dataset.TokenSplit], queries: Mapping[str, np.ndarray], k: int, *,
            overfetch: int = 4, metric: str = "ip", index_spec: str = "auto",
            memory_budget_gb: float = 4.0, nprobe: int = index_lib.NPROBE,
            ef_search: int = index_lib.EF_SEARCH, batch_size: int = 256,
            batch_keys: Sequence[str] = REFRESH_BATCH_KEYS) -> core.Retrieved:
  """Re-embeds the datastore with new encoders and recomputes REALM candidates (in memory).

  Args:
    embed_docs: (int32 [n, m] datastore chunks, float32 [n, E] their stale embeddings)
      -> float32 [n, E] (the document encoder).
    embed_queries: (int32 [n, m] first chunks of sequences, float32 [n, E] their stale
      embeddings) -> float32 [n, E] (the query encoder). Both are called on batches of
      exactly `batch_size` rows (the last one zero-padded).
    datastore: the chunk table to re-embed and index.
    stale_NxE: its chunks' embeddings in the original index (what embed_docs starts from).
    splits: name -> split whose sequences get candidates.
    queries: name -> float32 [S, E], the stale query vectors of the split's sequences (the
      artifact's `query_embedding`); kept in the new candidates.
    k: candidates per sequence (the request's k); the other arguments configure the search
      as in the config; batch_keys: the request's batch_keys.
  Returns:
    Retrieved(kind="realm_candidates") of the new candidates; their `candidate_embeddings`
    (and `query_embedding`) are the stale ones, which the model's encoders take as input.
  """
  m = datastore.chunk_size
  doc_NxE = _embed_in_batches(embed_docs, (datastore.chunk_tokens(), stale_NxE), batch_size,
                              "refresh: embed datastore")
  index = index_lib.build_index(doc_NxE, metric, index_spec, memory_budget_gb=memory_budget_gb,
                                nprobe=nprobe, ef_search=ef_search)
  chunk_doc_N = np.asarray(datastore.chunk_doc())
  out = {}
  for name, split in splits.items():
    L = split.seq_len
    starts = np.arange(split.num_sequences) * L
    first_Sxm = np.asarray(split.tokens[starts[:, None] + np.arange(m)])
    q_SxE = _embed_in_batches(embed_queries, (first_Sxm, queries[name]), batch_size,
                              f"refresh: embed {name} queries")
    docs_SxJ = core.query_docs(split.token_doc, core.doc_codes(split.doc_ids, datastore.doc_ids),
                               starts, starts + L)
    ids_SxK, scores_SxK = core.retrieve(index, q_SxE, docs_SxJ, chunk_doc_N, k, overfetch, metric)
    live_SxK = ids_SxK >= 0
    out[name] = {
        "candidate_ids": ids_SxK,
        "candidates": core.chunk_windows(datastore.tokens, datastore.token_doc, ids_SxK, m, m),
        "candidate_embeddings": np.where(live_SxK[..., None],
                                         stale_NxE[np.where(live_SxK, ids_SxK, 0)], 0),
        "candidate_scores": scores_SxK,
        QUERIES: queries[name]}
  return core.Retrieved(kind=ARTIFACT, arrays=out, batch_keys=tuple(batch_keys),
                        per_query=(QUERIES,))
