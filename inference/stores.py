"""The datastores a sampler retrieves from: chunks by text (RETRO, REALM, In-Context RALM)
and kNN-LM entries by key, with what each hit was (document, position, text) for citations.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np

import configs
from common.errors import UserError
from data import dataset
from inference.sampling import Neighbour
from retrieval import core, datastore
from retrieval import index as index_lib
from retrieval import knn_datastore as knn_lib

KNN_CONTEXT = 16  # kNN-LM: tokens of context shown before a cited entry's next token


class ChunkStore:
  """The datastore chunk table, its BERT embeddings and FAISS index (built and cached as
  for training), for retrieval by text while generating. Get one with `chunk_store`."""

  def __init__(self, config: ml_collections.ConfigDict, prepared: dataset.Prepared):
    self.tokenizer = prepared.tokenizer
    self.store = datastore.load_datastore(config, prepared)
    self.embedder = datastore.load_embedder(config)
    self.embeddings_NxE, _, self.index, _ = datastore.store_vectors(config, prepared, self.store,
                                                                    self.embedder)
    split = self.store.split
    self.m = split.chunk_size
    self.align = config.retrieval.align_neighbours
    self.chunk_doc_N = np.asarray(split.chunk_doc())
    self.doc_start_D = split.doc_starts()[:-1]

  def search(self, chunks_Bxm: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, k] (-1 = none), distances [B, k]) of the chunks nearest to each row."""
    return self.search_vectors(self.embed(chunks_Bxm), k)

  def embed(self, chunks_Bxm: np.ndarray) -> np.ndarray:
    """float32 [B, E]: the embedder's vectors of token chunks (the index's query space)."""
    return self.embedder.embed_chunks(chunks_Bxm, self.tokenizer)

  def search_vectors(self, queries_BxE: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`search` by query vectors from `embed`."""
    dists_BxK, ids_BxK = index_lib.search(self.index, queries_BxE, k)
    return ids_BxK, dists_BxK

  def windows(self, ids_BxK: np.ndarray, length: int, query_BxT: np.ndarray | None = None
              ) -> np.ndarray:
    """int32 [B, K, length]: the tokens from each chunk's start (0 past its document); with
    the query and `retrieval.align_neighbours`, from the shift that aligns the chunk with the
    query's last m tokens, as the training neighbours were built."""
    split = self.store.split
    query_BxM = None
    if self.align and query_BxT is not None:
      query_BxM = np.zeros((len(query_BxT), self.m), np.int32)
      tail_BxT = np.asarray(query_BxT)[:, -self.m:]
      query_BxM[:, self.m - tail_BxT.shape[1]:] = tail_BxT
    return core.chunk_windows(split.tokens, split.token_doc, ids_BxK, self.m, length, query_BxM)

  def neighbour(self, chunk: int, distance: float, tokens: np.ndarray,
                weight: float | None = None) -> Neighbour:
    doc = int(self.chunk_doc_N[chunk])
    return Neighbour(chunk=int(chunk), doc_id=self.store.split.doc_ids[doc],
                     position=int(chunk) * self.m - int(self.doc_start_D[doc]),
                     distance=float(distance), text=self.tokenizer.decode(tokens.tolist()),
                     weight=weight)


@functools.lru_cache(maxsize=2)
def _chunk_store(config_json: str) -> ChunkStore:
  config = configs.from_json(config_json)
  return ChunkStore(config, dataset.prepare(config))


def chunk_store(config: ml_collections.ConfigDict) -> ChunkStore:
  """The config's `ChunkStore`, kept for the next call (loading the embedder and compiling
  its forward pass take seconds)."""
  return _chunk_store(config.to_json())


class KnnStore:
  """The kNN-LM datastore for sampling: search with entry ids, and where each entry comes
  from (entry e is the e-th non-padding target of the split's sequences, in order, as
  `build_knn_datastore` stores them)."""

  def __init__(self, store: knn_lib.KnnDatastore, split: dataset.TokenSplit,
               tokenizer: Any):
    self.store, self.split, self.tokenizer = store, split, tokenizer
    self.position_E = store.entry_positions(split)  # each entry's token's position
    if len(self.position_E) != store.keys.shape[0]:
      raise UserError(f"the kNN-LM datastore {store.directory} has {store.keys.shape[0]} "
                      f"entries but the {split.name} split has {len(self.position_E)} targets; "
                      f"delete {store.directory} to rebuild it")
    self.doc_start_D = split.doc_starts()[:-1]

  def neighbour(self, entry: int, distance: float, weight: float) -> Neighbour:
    q = int(self.position_E[entry])
    doc = int(self.split.token_doc[q])
    start = int(self.doc_start_D[doc])
    context = np.asarray(self.split.tokens[max(start, q - KNN_CONTEXT):q + 1])
    return Neighbour(chunk=q // self.split.chunk_size, doc_id=self.split.doc_ids[doc],
                     position=q - start, distance=float(distance),
                     text=self.tokenizer.decode(context.tolist()), weight=weight)

  def search(self, q_BxD: np.ndarray, k: int, exact: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`KnnDatastore.search` plus the entry ids: (dists [B, k], tokens [B, k], ids [B, k])."""
    store = self.store
    dists_BxK, ids_BxK = index_lib.search(store.index, np.ascontiguousarray(q_BxD, np.float32), k)
    live_BxK = ids_BxK >= 0
    safe_BxK = np.where(live_BxK, ids_BxK, 0)
    if exact:
      keys_BxKxD = np.asarray(store.keys[safe_BxK.reshape(-1)], np.float32).reshape(
          *safe_BxK.shape, -1)
      dists_BxK = ((keys_BxKxD - q_BxD[:, None, :]) ** 2).sum(-1)
      order_BxK = np.argsort(np.where(live_BxK, dists_BxK, np.inf), axis=1, kind="stable")
      dists_BxK, ids_BxK, live_BxK, safe_BxK = (np.take_along_axis(a, order_BxK, axis=1) for a in
                                                (dists_BxK, ids_BxK, live_BxK, safe_BxK))
    dists_BxK = np.where(live_BxK, dists_BxK, np.inf).astype(np.float32)
    tokens_BxK = np.where(live_BxK, np.asarray(store.values[safe_BxK.reshape(-1)]).reshape(
        safe_BxK.shape), 0).astype(np.int32)
    return dists_BxK, tokens_BxK, ids_BxK
