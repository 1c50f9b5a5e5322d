"""The kNN-LM datastore (Khandelwal et al. 2020): a trained LM's keys -> next tokens.

    knn = knn_datastore(config, prepared, keys_fn, model_hash)     # built once per checkpoint
    dists_NxK, tokens_NxK = knn.search(keys_NxD, k, exact=True)
    opted_out = without(knn, prepared.train, ["milton/*"])         # an edited copy (cached)

The keys are the LM's inputs to its final feed-forward layer at every position of the
training split with a real target (float16 [N, D], memory-mapped), the values the next
tokens (int32 [N]); an L2 FAISS index over the keys is saved beside them. Built resumably
(shards.py) into `cache_root/knn_datastore/<fingerprint>.partial/`, committed with a
manifest naming the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import faiss
import ml_collections
import numpy as np

from common import artifacts
from data import dataset
from retrieval import edit
from retrieval import index as index_lib
from retrieval import shards

ARTIFACT = "knn_datastore"  # cache kind and manifest kind
KNN_SEQUENCES_PER_SHARD = 64  # sequences of kNN-LM keys per resumable shard
# The index's recall@RECALL_K against exact search, on RECALL_QUERIES of its own keys, is
# measured at build time (manifest `recall_at_k`); below RECALL_WARN a line says so: an
# undertrained model's near-duplicate keys defeat IVF-PQ (a 30-step model: 0.05).
RECALL_K, RECALL_QUERIES, RECALL_WARN = 16, 1000, 0.5


class KnnDatastore:
  """kNN-LM keys (float16 [N, D], memmap) -> values (next token, int32 [N]), with an L2 index."""

  def __init__(self, directory: Path, manifest: dict, nprobe: int = index_lib.NPROBE,
               ef_search: int = index_lib.EF_SEARCH):
    self.directory = directory
    self.manifest = manifest
    self.keys = np.load(directory / "keys.npy", mmap_mode="r")
    self.values = np.load(directory / "values.npy", mmap_mode="r")
    self.index = index_lib.load_index(directory / "index.faiss", nprobe, ef_search)
    # An edited copy (`without`) stores each entry's stream position; else entry e is the
    # e-th non-padding target of the split (`entry_positions`).
    positions = directory / "positions.npy"
    self.positions = np.load(positions, mmap_mode="r") if positions.is_file() else None
    # Distances from a Flat index or a refined one (`...,RFlat`) are exact squared L2 to the
    # float32 values of the stored float16 keys already: re-ranking them again is a no-op.
    self.exact_distances = isinstance(faiss.downcast_index(self.index),
                                      (faiss.IndexFlat, faiss.IndexRefine))

  def entry_positions(self, split: dataset.TokenSplit) -> np.ndarray:
    """int64 [N]: the stream position in `split` (the split it was built over) of each
    entry's next token: stored by an edited copy, else `entry_positions(split)`."""
    return entry_positions(split) if self.positions is None else np.asarray(self.positions)

  @classmethod
  def load(cls, directory: str | os.PathLike, expected_inputs: Mapping[str, str], hint: str,
           nprobe: int = index_lib.NPROBE, ef_search: int = index_lib.EF_SEARCH
           ) -> KnnDatastore:
    """Opens a committed datastore whose manifest matches `expected_inputs` and whose files
    are intact (else one-line UserError)."""
    directory = Path(directory)
    manifest = artifacts.check_manifest(directory, expected_inputs, hint)
    return cls(directory, manifest, nprobe, ef_search)

  def search(self, queries_NxD: np.ndarray, k: int, exact: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances float32 [N, k], next tokens int32 [N, k]), nearest first.

    exact=True recomputes the distances from the stored keys (the index may be
    approximate) and re-sorts; an index that already re-ranks its candidates by exact
    distances to the stored keys (Flat, or refined `...,RFlat`: `exact_distances`) returns
    them as they are. Missing hits have distance +inf and token 0.
    """
    q_NxD = np.ascontiguousarray(queries_NxD, np.float32)
    dists_NxK, ids_NxK = index_lib.search(self.index, q_NxD, k)
    live_NxK = ids_NxK >= 0
    safe_NxK = np.where(live_NxK, ids_NxK, 0)
    exact = exact and not self.exact_distances
    if exact:
      keys_NxKxD = np.asarray(self.keys[safe_NxK.reshape(-1)], np.float32).reshape(
          *safe_NxK.shape, -1)
      dists_NxK = ((keys_NxKxD - q_NxD[:, None, :]) ** 2).sum(-1)
    dists_NxK = np.where(live_NxK, dists_NxK, np.inf).astype(np.float32)
    tokens_NxK = np.where(live_NxK, np.asarray(self.values[safe_NxK.reshape(-1)]).reshape(
        safe_NxK.shape), 0).astype(np.int32)
    if exact:
      order_NxK = np.argsort(dists_NxK, axis=1, kind="stable")
      dists_NxK = np.take_along_axis(dists_NxK, order_NxK, axis=1)
      tokens_NxK = np.take_along_axis(tokens_NxK, order_NxK, axis=1)
    return dists_NxK, tokens_NxK


def build_knn_datastore(keys_fn: Callable[[np.ndarray], np.ndarray], split: dataset.TokenSplit,
                        directory: str | os.PathLike, inputs: Mapping[str, str], *,
                        batch_size: int = 8, index_spec: str = "auto",
                        memory_budget_gb: float = 4.0, nprobe: int = index_lib.NPROBE,
                        ef_search: int = index_lib.EF_SEARCH) -> KnnDatastore:
  """Runs `keys_fn` over every sequence of `split` and stores (key, next token) pairs.

  Args:
    keys_fn: int32 inputs [B, L] -> keys [B, L, D] (the LM's input to its final
      feed-forward layer); called on batches of exactly `batch_size` rows.
    split: the sequences to run over; positions with a padding target (0) are skipped.
    directory: where the datastore goes (resumable build into `<directory>.partial`).
    inputs: hashes recorded in the manifest: the model checkpoint, the dataset, ...
  """
  directory = Path(directory)
  if artifacts.read_manifest(directory) is not None:
    return KnnDatastore.load(directory, inputs, f"delete {directory} to rebuild it",
                             nprobe, ef_search)
  with artifacts.building(directory) as work:

    def compute(s0: int, s1: int) -> dict[str, np.ndarray]:
      keys, values = [], []
      for start in range(s0, s1, batch_size):
        idx_B = np.arange(start, start + batch_size)
        idx_B[idx_B >= s1] = -1
        batch = split.batch(idx_B)
        keys_BxLxD = np.asarray(keys_fn(batch["inputs"]))
        live_BxL = batch["weights"] > 0
        keys.append(keys_BxLxD[live_BxL].astype(np.float16))
        values.append(batch["targets"][live_BxL].astype(np.int32))
      return {"keys": np.concatenate(keys), "values": np.concatenate(values)}

    arrays = shards.sharded_rows(work, split.num_sequences, KNN_SEQUENCES_PER_SHARD, compute,
                          desc=f"kNN-LM keys ({split.name})", unit="tok",
                          units_per_row=split.seq_len)
    n, d = arrays["keys"].shape
    factory = (index_lib.choose_factory(n, d, memory_budget_gb) if index_spec == "auto"
               else index_spec)
    index = index_lib.build_index(arrays["keys"], "l2", factory,  # float16 memmap, batched
                                  memory_budget_gb=memory_budget_gb, nprobe=nprobe,
                                  ef_search=ef_search)
    index_lib.save_index(index, work / "index.faiss")
    recall = index_lib.sample_recall(index, arrays["keys"], "l2", RECALL_K, RECALL_QUERIES)
    print(f"kNN-LM datastore: {n:,} keys, index {factory}, recall@{RECALL_K} {recall:.2f} "
          f"against exact search on {min(n, RECALL_QUERIES):,} of its keys", flush=True)
    if recall < RECALL_WARN:
      print(f"warning: the kNN-LM index finds few of the exact neighbours (near-duplicate "
            f"keys?); for exact search set --config.retrieval.index=Flat", flush=True)
    artifacts.write_manifest(work, ARTIFACT, inputs, entries=int(arrays["keys"].shape[0]),
                             key_dim=int(arrays["keys"].shape[1]), keys_dtype="float16",
                             values_dtype="int32", metric="l2", index_spec=factory,
                             split=split.name, recall_at_k={str(RECALL_K): recall})
  return KnnDatastore.load(directory, inputs, f"delete {directory} to rebuild it", nprobe,
                           ef_search)


def knn_datastore(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                  keys_fn: Callable[[np.ndarray], np.ndarray], model_hash: str,
                  split: str = "train") -> KnnDatastore:
  """The kNN-LM datastore of `split` under a trained model, built once per model checkpoint.

  `model_hash` identifies the checkpoint whose `keys_fn` made the keys; it is recorded in
  the manifest and is part of the cache key.
  """
  r = config.retrieval
  inputs = {**prepared.hashes, "model": model_hash,
            "params": artifacts.fingerprint({"split": split, "seq_len": config.data.seq_len,
                                             "index": r.index,
                                             "memory_budget_gb": r.memory_budget_gb})}
  directory = artifacts.cache_root(config.data.cache_dir) / ARTIFACT / artifacts.fingerprint(inputs)
  return build_knn_datastore(keys_fn, prepared.split(split), directory, inputs,
                             batch_size=config.eval.batch_size, index_spec=r.index,
                             memory_budget_gb=r.memory_budget_gb, nprobe=r.nprobe,
                             ef_search=r.ef_search)


def entry_positions(split: dataset.TokenSplit) -> np.ndarray:
  """int64 [N]: the stream position of each entry's next token, as `build_knn_datastore`
  stores them (every non-padding target of the split's sequences, in order)."""
  targets = np.asarray(split.tokens[1:split.num_sequences * split.seq_len + 1])
  return np.flatnonzero(targets) + 1


def without(store: KnnDatastore, split: dataset.TokenSplit, remove: Sequence[str],
            nprobe: int = index_lib.NPROBE, ef_search: int = index_lib.EF_SEARCH
            ) -> KnnDatastore:
  """A copy of `store` (built over `split`) without what the documents matching `remove`
  (ids or globs, `retrieval.edit.match_documents`) put in it: their entries (next tokens)
  and every later entry of a sequence holding one of their tokens, whose key saw it. No
  retraining; cached beside `store`. This is not what a fresh build from the edited corpus
  gives (there the sequences are cut differently and the kept keys see other context), but
  nothing of the removed text is left in a key or a value. The index is refilled with the
  kept keys (a Flat one is then exact over them)."""
  removed = edit.match_documents(split.doc_ids, edit.read_patterns(remove))
  removed_ids = [split.doc_ids[i] for i in removed]
  inputs = {**store.manifest["inputs"],
            "without": artifacts.fingerprint({"parent": store.directory.name,
                                              "removed": removed_ids})}
  directory = store.directory.parent / artifacts.fingerprint(inputs)
  if artifacts.read_manifest(directory) is None:
    with artifacts.building(directory) as work:
      positions_E = store.entry_positions(split)
      end = split.num_sequences * split.seq_len + 1
      hit_T = np.isin(np.asarray(split.token_doc[:end]), removed)
      seen_T = np.concatenate([[0], np.cumsum(hit_T)])  # removed tokens before position t
      first_E = (positions_E - 1) // split.seq_len * split.seq_len  # the sequence's first
      keep_E = seen_T[positions_E + 1] == seen_T[first_E]  # none in [first, position]
      keys = np.asarray(store.keys)[keep_E]
      artifacts.atomic_save_npy(work / "keys.npy", keys)
      artifacts.atomic_save_npy(work / "values.npy", np.asarray(store.values)[keep_E])
      artifacts.atomic_save_npy(work / "positions.npy", positions_E[keep_E])
      index = index_lib.refill(store.index, keys, nprobe, ef_search)
      index_lib.save_index(index, work / "index.faiss")
      artifacts.write_manifest(work, ARTIFACT, inputs, **{
          key: store.manifest[key] for key in ("key_dim", "keys_dtype", "values_dtype",
                                               "metric", "index_spec", "split")},
          entries=int(keep_E.sum()), parent=store.directory.name, removed=removed_ids,
          removed_entries=int((~keep_E).sum()))
  return KnnDatastore.load(directory, inputs, f"delete {directory} to rebuild it", nprobe,
                           ef_search)
