"""The search core shared by every retrieval job (pure numpy + FAISS; no config), and its
result container.

    codes_D = doc_codes(split.doc_ids, store.doc_ids)
    docs_QxJ = query_docs(split.token_doc, codes_D, first_Q, last_Q)     # documents to exclude
    ids_QxK, dists_QxK = retrieve(index, queries_QxE, docs_QxJ, store.chunk_doc(), k,
                                  overfetch, metric)                    # best k of other docs
    tokens_QxKxR = chunk_windows(store.tokens, store.token_doc, ids_QxK, m, R)

Retrieval over-fetches `k * overfetch` chunks and drops those of the query's documents (by
doc-id string, so it works across splits and corpora), keeping the best k; rows with fewer
than k survivors are filled with id -1 (all-padding tokens, worst distance). A retrieved
chunk is materialised as `length` tokens from its start (or from the shift that aligns it
with its query: `align_offsets`); tokens of any other document (past the document's end)
are 0.

`Retrieved` holds a committed neighbours/candidates artifact (per split, memory-mapped);
`load_retrieved` opens one after checking its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common import artifacts
from common.errors import UserError
from retrieval import index as index_lib


def doc_codes(query_doc_ids: Sequence[str], datastore_doc_ids: Sequence[str]) -> np.ndarray:
  """int64 [Dq]: each query document's index among the datastore's documents, else -1."""
  position = {doc_id: i for i, doc_id in enumerate(datastore_doc_ids)}
  return np.array([position.get(d, -1) for d in query_doc_ids], np.int64).reshape(-1)


def query_docs(token_doc_T: np.ndarray, codes_D: np.ndarray, first_Q: np.ndarray,
               last_Q: np.ndarray) -> np.ndarray:
  """int64 [Q, 2]: datastore document codes of tokens `first` and `last` (clipped to the stream).

  The stream is in document order, so these are the documents a query window starts and
  ends in: its own document and the one whose future tokens the retrieval can help predict.
  """
  last_Q = np.minimum(last_Q, len(token_doc_T) - 1)
  return np.stack([codes_D[np.asarray(token_doc_T[first_Q])],
                   codes_D[np.asarray(token_doc_T[last_Q])]], axis=1)


def exclude_same_document(ids_QxF: np.ndarray, dists_QxF: np.ndarray, docs_QxJ: np.ndarray,
                          chunk_doc_N: np.ndarray, k: int, metric: str
                          ) -> tuple[np.ndarray, np.ndarray]:
  """The first k hits per row whose chunk is not from any of the row's documents.

  Args:
    ids_QxF, dists_QxF: search results, best first (id -1 = no hit).
    docs_QxJ: datastore document codes to exclude per query (-1 = none).
    chunk_doc_N: datastore document code of every datastore chunk.
    k: hits to keep.
    metric: "ip" or "l2": the fill distance of a missing hit is the worst one (-inf/+inf).
  Returns:
    ids int64 [Q, k] (-1 where fewer than k hits survive), dists float32 [Q, k].
  """
  hit_QxF = ids_QxF >= 0
  nbr_doc_QxF = np.asarray(chunk_doc_N)[np.where(hit_QxF, ids_QxF, 0)]
  same_QxF = ((nbr_doc_QxF[:, :, None] == docs_QxJ[:, None, :])
              & (docs_QxJ[:, None, :] >= 0)).any(axis=2)
  keep_QxF = hit_QxF & ~same_QxF
  if ids_QxF.shape[1] < k:
    pad = ((0, 0), (0, k - ids_QxF.shape[1]))
    ids_QxF, dists_QxF, keep_QxF = (np.pad(a, pad) for a in (ids_QxF, dists_QxF, keep_QxF))
  order_QxK = np.argsort(~keep_QxF, axis=1, kind="stable")[:, :k]
  kept_QxK = np.take_along_axis(keep_QxF, order_QxK, axis=1)
  worst = -np.inf if metric == "ip" else np.inf
  ids_QxK = np.where(kept_QxK, np.take_along_axis(ids_QxF, order_QxK, axis=1), -1)
  dists_QxK = np.where(kept_QxK, np.take_along_axis(dists_QxF, order_QxK, axis=1), worst)
  return ids_QxK.astype(np.int64), dists_QxK.astype(np.float32)


def retrieve(index, queries_QxE: np.ndarray, docs_QxJ: np.ndarray, chunk_doc_N: np.ndarray,
             k: int, overfetch: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """Searches k*overfetch hits, then keeps the best k from other documents."""
  dists_QxF, ids_QxF = index_lib.search(index, np.ascontiguousarray(queries_QxE, np.float32),
                                        k * overfetch)
  return exclude_same_document(ids_QxF, dists_QxF, docs_QxJ, chunk_doc_N, k, metric)


def chunk_windows(tokens_T: np.ndarray, token_doc_T: np.ndarray, ids_QxK: np.ndarray,
                  chunk_size: int, length: int, queries_QxM: np.ndarray | None = None
                  ) -> np.ndarray:
  """int32 [Q, K, length]: `length` tokens from the start of each chunk id (-1: all 0).

  Tokens of a document other than the chunk's own (its first token's), or past the end of
  the stream, are 0: a neighbour never runs on into the next document. With `queries_QxM`
  (the query chunk of each row, m = chunk_size tokens), each window starts at the shift
  `align_offsets` picks instead, so its continuation lines up with the query's.
  """
  live_QxK = ids_QxK >= 0
  chunk_QxK = np.where(live_QxK, ids_QxK, 0).astype(np.int64) * chunk_size
  own_QxKx1 = np.asarray(token_doc_T[chunk_QxK])[..., None]
  start_QxK = chunk_QxK
  if queries_QxM is not None:
    start_QxK = chunk_QxK + align_offsets(tokens_T, token_doc_T, chunk_QxK, queries_QxM)
  pos_QxKxR = start_QxK[..., None] + np.arange(length)
  inside_QxKxR = pos_QxKxR < len(tokens_T)
  pos_QxKxR = np.minimum(pos_QxKxR, len(tokens_T) - 1)
  same_QxKxR = np.asarray(token_doc_T[pos_QxKxR]) == own_QxKx1
  keep_QxKxR = inside_QxKxR & same_QxKxR & live_QxK[..., None]
  return np.where(keep_QxKxR, np.asarray(tokens_T[pos_QxKxR]), 0).astype(np.int32)


def align_offsets(tokens_T: np.ndarray, token_doc_T: np.ndarray, start_QxK: np.ndarray,
                  queries_QxM: np.ndarray) -> np.ndarray:
  """int64 [Q, K] shifts in (-m, m) that line each retrieved chunk up with its query.

  A chunk retrieved for query chunk q usually holds q's passage at some offset (another
  edition, a repeated speech). Shift d scores the positions i where the stream token at
  start + d + i (in the chunk's document) equals q_i (not padding), weighted by i + 1 so
  the tokens nearest the continuation count most; the best score wins, ties go to the
  smallest |d|, and a chunk that matches nowhere keeps d = 0. Neighbours whose
  continuation is aligned with the query's own are what RETRO's cross-attention learns to
  copy from fastest: the read position is then fixed, not found by content.
  """
  Q, M = queries_QxM.shape
  q_Qx1xM = np.asarray(queries_QxM)[:, None, :]
  weight_M = np.arange(1, M + 1, dtype=np.float32)
  own_QxKx1 = np.asarray(token_doc_T[start_QxK])[..., None]
  best_QxK = np.zeros(start_QxK.shape, np.float32)
  shift_QxK = np.zeros(start_QxK.shape, np.int64)
  for d in sorted(range(-M + 1, M), key=abs):
    pos_QxKxM = start_QxK[..., None] + d + np.arange(M)
    ok_QxKxM = (pos_QxKxM >= 0) & (pos_QxKxM < len(tokens_T))
    pos_QxKxM = np.clip(pos_QxKxM, 0, len(tokens_T) - 1)
    hit_QxKxM = (ok_QxKxM & (np.asarray(tokens_T[pos_QxKxM]) == q_Qx1xM) & (q_Qx1xM != 0)
                 & (np.asarray(token_doc_T[pos_QxKxM]) == own_QxKx1))
    score_QxK = hit_QxKxM.astype(np.float32) @ weight_M
    better_QxK = score_QxK > best_QxK
    best_QxK = np.where(better_QxK, score_QxK, best_QxK)
    shift_QxK = np.where(better_QxK, d, shift_QxK)
  return shift_QxK


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """Neighbours or candidates: per split, array name -> [num_seq, ...] array.

  kind "retro_neighbours" (retrieval/neighbours.py): `neighbours` int32 [S, W, K, R],
  `neighbour_ids` int64 [S, W, K] (datastore chunk, -1 = none), `neighbour_dists` float32
  [S, W, K], W query windows per sequence. kind "realm_candidates" (retrieval/candidates.py):
  `candidate_ids` int64 [S, K], `candidates` int32 [S, K, R], `candidate_embeddings`
  float32 [S, K, E], `candidate_scores` float32 [S, K], `query_embedding` float32 [S, E].
  Arrays are memory-mapped when read from disk. `batch_keys`: the arrays that go into a
  batch (the request's); `per_query`: the arrays without a K axis (one row per query).
  """

  kind: str
  arrays: dict[str, dict[str, np.ndarray]]
  directory: Path | None = None
  manifest: dict | None = None
  batch_keys: tuple[str, ...] = ()
  per_query: tuple[str, ...] = ()

  @property
  def _k_axis(self) -> int:
    """The axis of K in every array: the last axis of the `*_ids` array."""
    per = next(iter(self.arrays.values()))
    return next(a for name, a in per.items() if name.endswith("_ids")).ndim - 1

  @property
  def k(self) -> int:
    """Items retrieved per query."""
    return next(iter(self.arrays.values()))[self.batch_keys[0]].shape[self._k_axis]

  def first_k(self, k: int) -> Retrieved:
    """The same artifact with only the first (best) k items of every query."""
    axis = self._k_axis
    take = (slice(None),) * axis + (slice(0, k),)
    arrays = {split: {name: a if name in self.per_query else a[take] for name, a in per.items()}
              for split, per in self.arrays.items()}
    return dataclasses.replace(self, arrays=arrays)

  def batch(self, split: str, index_B: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays `batch_keys` of sequences `index_B`; index -1 gives zero rows."""
    if split not in self.arrays:
      raise UserError(f"{self.kind} at {self.directory} has no {split!r} split (it holds "
                      f"{', '.join(self.arrays)}); rebuild with that split included")
    idx_B = np.asarray(index_B, np.int64)
    live_B = idx_B >= 0
    out = {}
    for name in self.batch_keys:
      rows = np.asarray(self.arrays[split][name][np.maximum(idx_B, 0)])
      live = live_B.reshape(-1, *([1] * (rows.ndim - 1)))
      out[name] = np.where(live, rows, 0).astype(rows.dtype)
    return out


def load_retrieved(directory: str | os.PathLike, expected_inputs: Mapping[str, str],
                   hint: str, batch_keys: Sequence[str] = (), rebuild: str = "",
                   per_query: Sequence[str] = ()) -> Retrieved:
  """A committed neighbours/candidates artifact, after checking its manifest against
  `expected_inputs` (one-line UserError "stale <kind> at ..." otherwise) and its files
  (one-line "<kind> artifact ... is damaged: ..."; `rebuild`: the command that rebuilds it;
  `per_query`: its arrays without a K axis)."""
  directory = Path(directory)
  manifest = artifacts.check_manifest(directory, expected_inputs, hint, rebuild)
  arrays = {}
  for listing in sorted(directory.glob("*/arrays.json")):
    names = json.loads(listing.read_text())
    arrays[listing.parent.name] = {name: np.load(listing.parent / f"{name}.npy", mmap_mode="r")
                                   for name in names}
  return Retrieved(kind=manifest["kind"], arrays=arrays, directory=directory, manifest=manifest,
                   batch_keys=tuple(batch_keys), per_query=tuple(per_query))
