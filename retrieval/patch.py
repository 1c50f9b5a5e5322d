"""Neighbours and candidates of an edited datastore from its parent's, searching again only
the rows the edit can change (`retrieval.edit`, build.py).

A row (one sequence's neighbours or candidates) of the parent version stays what a fresh
search of the edited version returns unless the edit can reach it:
- it holds a removed chunk;
- it has an unfilled item (-1): removals leave room for hits that were crowded out by
  same-document chunks, additions may fill it;
- an added chunk scores at least as well as the row's k-th item under one of its queries
  (an exact search over the added chunks alone; conservative: the added chunk may belong to
  the query's own document and be excluded).
Other rows keep their items (ids renumbered: the kept chunks keep their order), tokens and
scores: removing chunks they do not hold cannot push theirs out of the over-fetched
window, and no added chunk outranks them. With a Flat index the result is therefore the
arrays a fresh build of the edited corpus makes (tests/test_edit.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from data import dataset
from retrieval import datastore as datastore_lib
from retrieval import index as index_lib
from retrieval import shards

if TYPE_CHECKING:
  from retrieval.build import Builder, Search

ROWS_PER_SHARD = 1024  # sequences per resumable shard of a patched split


def affected_rows(ids_SxQxK: np.ndarray, scores_SxQxK: np.ndarray, removed_P: np.ndarray,
                  added_best_SxQ: np.ndarray | None, metric: str) -> np.ndarray:
  """bool [S]: the parent rows an edit can change (module docstring). `removed_P`: bool per
  parent chunk; `added_best_SxQ`: the best score of any added chunk under each query (None:
  nothing added)."""
  live = ids_SxQxK >= 0
  hit = live & removed_P[np.where(live, ids_SxQxK, 0)]
  out_S = hit.reshape(len(hit), -1).any(1)
  if removed_P.any() or added_best_SxQ is not None:
    out_S |= (~live).reshape(len(live), -1).any(1)
  if added_best_SxQ is not None:
    kth_SxQ = scores_SxQxK[..., -1]
    wins = added_best_SxQ >= kth_SxQ if metric == "ip" else added_best_SxQ <= kth_SxQ
    out_S |= wins.reshape(len(wins), -1).any(1)
  return out_S


def patched_search(builder: Builder, parent_dir: Path, parent: datastore_lib.Parent,
                   store: datastore_lib.Datastore, metric: str) -> Search:
  """A `Builder.search` for `store` (edited from `parent`) that copies the cached arrays in
  `parent_dir` and recomputes the affected rows with `builder.rows`."""
  parent_n = parent.store.split.num_chunks
  chunk_N = np.asarray(parent.chunk_N)
  new_of_old_P = np.full(parent_n + 1, -1, np.int64)  # entry parent_n: the -1 of unfilled
  kept_N = chunk_N >= 0
  new_of_old_P[chunk_N[kept_N]] = np.flatnonzero(kept_N)
  removed_P = new_of_old_P[:parent_n] < 0
  added_N = np.flatnonzero(~kept_N)

  def search(config, request, directory: Path, split: dataset.TokenSplit, queries_NxE,
             store_: datastore_lib.Datastore, store_NxE, index, timings) -> dict[str, np.ndarray]:
    old = {path.stem: np.load(path, mmap_mode="r")
           for path in sorted((parent_dir / split.name).glob("*.npy"))}
    rows = builder.rows(config, request, split, queries_NxE, store_, store_NxE, index, timings)
    ids_name, dists_name = builder.ids, builder.dists
    added = None
    if len(added_N):
      added = faiss.IndexFlat(store_NxE.shape[1], index_lib.METRICS[metric])
      added.add(np.ascontiguousarray(store_NxE[added_N], np.float32))

    def compute(s0: int, s1: int) -> dict[str, np.ndarray]:
      out = {name: np.array(a[s0:s1]) for name, a in old.items()}
      ids_S_K = out[ids_name]
      ids_SxQxK = ids_S_K.reshape(s1 - s0, -1, ids_S_K.shape[-1])
      best = None
      if added is not None:
        Q = ids_SxQxK.shape[1]
        q_XxE = np.ascontiguousarray(queries_NxE[s0 * Q:s1 * Q], np.float32)
        best = added.search(q_XxE, 1)[0][:, 0].reshape(s1 - s0, Q)
      redo_S = affected_rows(ids_SxQxK, out[dists_name].reshape(ids_SxQxK.shape), removed_P,
                             best, metric)
      out[ids_name] = new_of_old_P[np.where(ids_S_K >= 0, ids_S_K, parent_n)].astype(
          ids_S_K.dtype)
      if redo_S.any():
        fresh = rows(np.flatnonzero(redo_S) + s0)
        for name, a in fresh.items():
          out[name][redo_S] = a
      timings["patched_rows"] = timings.get("patched_rows", 0) + int(redo_S.sum())
      return out

    return shards.sharded_rows(directory, split.num_sequences, ROWS_PER_SHARD, compute,
                               desc=f"{builder.artifact} ({split.name}, patched)", unit="seq")

  return search
