"""Precomputed retrieval: RETRO neighbours, REALM candidates and the kNN-LM datastore.

    store = load_datastore(config, prepared)                 # training split or another corpus
    nbrs = retro_neighbours(config, prepared)                # or realm_candidates(config, prepared)
    batch = {**prepared.train.batch(idx_B), **nbrs.batch("train", idx_B)}
    new = refresh(embed_docs, embed_queries, store.split,             # REALM stale-index refresh
                  datastore_embeddings(config, prepared, store), splits, k)
    knn = knn_datastore(config, prepared, keys_fn, model_hash)        # kNN-LM keys -> next tokens
    dists_NxK, tokens_NxK = knn.search(keys_NxD, k, exact=True)

The datastore is a packed chunk table (a `TokenSplit`): by default the training split, so
the training queries are exactly the datastore chunks and their embeddings are computed once.
Retrieval over-fetches `K * overfetch` chunks and drops those of the query's own document
(by doc-id string, so it works across splits and corpora; a query window that crosses into
the next document excludes that one too, since its future tokens come from it), keeping
the best K; rows with fewer than K survivors are filled with id -1 (all-padding tokens,
worst distance). Long documents need a large over-fetch: the manifest records the
`unfilled_fraction`. A RETRO neighbour is its chunk plus the next 64 tokens; tokens of any
other document (past the document's end) are 0.

Artifacts live in `cache_root/<kind>/<fingerprint of inputs>/` with a manifest of input
hashes: `embeddings` (embedder.py), `index` (FAISS), `retro_neighbours` and
`realm_candidates` (`<split>/<name>.npy`, read memory-mapped), `datastores` (another corpus
packed with the LM tokenizer) and `knn_datastore`. Builds write shards atomically into
`<dir>.partial/`; an interrupted build resumes from the shards already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from common import artifacts
from common.errors import UserError
from data import corpora
from data import dataset
from retrieval import embedder as embedder_lib
from retrieval import index as index_lib
from data import tokenizer as tokenizer_lib

RETRO, REALM, KNN = "retro_neighbours", "realm_candidates", "knn_datastore"
# The arrays of each kind that go into a training batch (the rest are kept for analysis).
BATCH_KEYS = {RETRO: ("neighbours",), REALM: ("candidates", "candidate_embeddings")}
QUERY_CHUNKS_PER_SHARD = 4096  # RETRO/REALM query chunks per resumable shard
KNN_SEQUENCES_PER_SHARD = 64  # sequences of kNN-LM keys per resumable shard
_DATASTORE_FORMAT = "packed-v1"


@dataclasses.dataclass(frozen=True)
class Datastore:
  """The retrieval corpus: a packed chunk table and the hash of its contents."""

  spec: str  # "" = the training split of data.corpus; else a corpus spec
  split: dataset.TokenSplit
  hash: str


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """RETRO neighbours or REALM candidates: per split, array name -> [num_seq, ...] array.

  RETRO: `neighbours` int32 [S, C, K, 2m], `neighbour_ids` int64 [S, C, K] (datastore chunk,
  -1 = none), `neighbour_dists` float32 [S, C, K]. REALM: `candidate_ids` int64 [S, K],
  `candidates` int32 [S, K, m], `candidate_embeddings` float32 [S, K, E],
  `candidate_scores` float32 [S, K]. Arrays are memory-mapped when read from disk.
  """

  kind: str
  arrays: dict[str, dict[str, np.ndarray]]
  directory: Path | None = None
  manifest: dict | None = None

  def batch(self, split: str, index_B: np.ndarray) -> dict[str, np.ndarray]:
    """The batch arrays (`BATCH_KEYS`) of sequences `index_B`; index -1 gives zero rows."""
    if split not in self.arrays:
      raise UserError(f"{self.kind} at {self.directory} has no {split!r} split (it holds "
                      f"{', '.join(self.arrays)}); rebuild with that split included")
    idx_B = np.asarray(index_B, np.int64)
    live_B = idx_B >= 0
    out = {}
    for name in BATCH_KEYS[self.kind]:
      rows = np.asarray(self.arrays[split][name][np.maximum(idx_B, 0)])
      live = live_B.reshape(-1, *([1] * (rows.ndim - 1)))
      out[name] = np.where(live, rows, 0).astype(rows.dtype)
    return out


def split_hash(split: dataset.TokenSplit) -> str:
  """Hash of a packed split's contents (tokens, token documents, doc ids)."""
  h = hashlib.sha256()
  for array in (split.tokens, split.token_doc):
    h.update(np.ascontiguousarray(array, np.int32).tobytes())
  h.update(json.dumps(list(split.doc_ids)).encode())
  return h.hexdigest()[:16]


# --- Retrieval core (pure numpy + FAISS; no config) ------------------------------------

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
                  chunk_size: int, length: int) -> np.ndarray:
  """int32 [Q, K, length]: `length` tokens from the start of each chunk id (-1: all 0).

  Tokens of a document other than the chunk's own (its first token's), or past the end of
  the stream, are 0: a neighbour never runs on into the next document.
  """
  live_QxK = ids_QxK >= 0
  start_QxK = np.where(live_QxK, ids_QxK, 0).astype(np.int64) * chunk_size
  pos_QxKxR = start_QxK[..., None] + np.arange(length)
  inside_QxKxR = pos_QxKxR < len(tokens_T)
  pos_QxKxR = np.minimum(pos_QxKxR, len(tokens_T) - 1)
  own_QxKx1 = np.asarray(token_doc_T[start_QxK])[..., None]
  same_QxKxR = np.asarray(token_doc_T[pos_QxKxR]) == own_QxKx1
  keep_QxKxR = inside_QxKxR & same_QxKxR & live_QxK[..., None]
  return np.where(keep_QxKxR, np.asarray(tokens_T[pos_QxKxR]), 0).astype(np.int32)


def sharded_rows(directory: Path, num_rows: int, rows_per_shard: int,
                 compute: Callable[[int, int], Mapping[str, np.ndarray]], desc: str,
                 unit: str = "row", units_per_row: int = 1) -> dict[str, np.ndarray]:
  """Computes rows [0, num_rows) shard by shard, resumably, into `directory/<name>.npy`.

  Each shard's arrays are saved atomically under `directory/shards/` with a done-marker
  written last, so a rerun after an interruption skips finished shards. When all are done
  they are joined along axis 0 (shards may have any number of rows) and `arrays.json`
  records the result; a directory that has it is returned without work. Returns the
  joined arrays memory-mapped.
  """
  directory.mkdir(parents=True, exist_ok=True)
  listing = directory / "arrays.json"
  if not listing.exists():
    shard_dir = directory / "shards"
    job = json.dumps({"num_rows": num_rows, "rows_per_shard": rows_per_shard})
    job_file = shard_dir / "job.json"
    if shard_dir.exists() and (not job_file.exists() or job_file.read_text() != job):
      shutil.rmtree(shard_dir)
    shard_dir.mkdir(exist_ok=True)
    artifacts.atomic_write_text(job_file, job)
    starts = range(0, num_rows, rows_per_shard)
    markers = [shard_dir / f"{i:05d}.done" for i in range(len(starts))]
    done = sum(min(rows_per_shard, num_rows - s) for s, f in zip(starts, markers) if f.exists())
    with tqdm(total=num_rows * units_per_row, initial=done * units_per_row, desc=desc,
              unit=unit, unit_scale=True) as bar:
      for i, (start, marker) in enumerate(zip(starts, markers)):
        if marker.exists():
          continue
        stop = min(start + rows_per_shard, num_rows)
        arrays = compute(start, stop)
        for name, array in arrays.items():
          artifacts.atomic_save_npy(shard_dir / f"{i:05d}.{name}.npy", array)
        artifacts.atomic_write_text(marker, json.dumps(sorted(arrays)))
        bar.update((stop - start) * units_per_row)
    shapes = {}
    for name in json.loads(markers[0].read_text()):
      parts = [np.load(shard_dir / f"{i:05d}.{name}.npy", mmap_mode="r")
               for i in range(len(starts))]
      shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
      tmp = directory / f".{name}.tmp.npy"
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=shape)
      row = 0
      for part in parts:
        out[row:row + len(part)] = part
        row += len(part)
      out.flush()
      del out
      os.replace(tmp, directory / f"{name}.npy")
      shapes[name] = {"shape": list(shape), "dtype": str(parts[0].dtype)}
    artifacts.atomic_write_text(listing, json.dumps(shapes, indent=2))
    shutil.rmtree(shard_dir)
  return {name: np.load(directory / f"{name}.npy", mmap_mode="r")
          for name in json.loads(listing.read_text())}


def retro_split(directory: Path, queries_NxE: np.ndarray, split: dataset.TokenSplit,
                store: dataset.TokenSplit, index, k: int, overfetch: int, metric: str,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """RETRO neighbours of every chunk of every sequence of `split` (resumable, see sharded_rows).

  Args:
    directory: where `neighbours.npy`, `neighbour_ids.npy`, `neighbour_dists.npy` go.
    queries_NxE: embeddings of `split`'s chunks (at least num_sequences * C rows).
    split: the query split; store: the datastore (the chunk table `index` was built on).
    timings: if given, seconds spent searching and materialising are added to it.
  """
  m = split.chunk_size
  C = split.seq_len // m
  R = 2 * m
  codes_D = doc_codes(split.doc_ids, store.doc_ids)
  chunk_doc_N = np.asarray(store.chunk_doc())
  timings = {} if timings is None else timings

  def compute(s0: int, s1: int) -> dict[str, np.ndarray]:
    rows = np.arange(s0 * C, s1 * C)
    t0 = time.perf_counter()
    ids_QxK, dists_QxK = retrieve(index, queries_NxE[s0 * C:s1 * C],
                                  query_docs(split.token_doc, codes_D, rows * m, rows * m + R),
                                  chunk_doc_N, k, overfetch, metric)
    t1 = time.perf_counter()
    nbr_QxKxR = chunk_windows(store.tokens, store.token_doc, ids_QxK, m, R)
    timings["search_s"] = timings.get("search_s", 0.0) + t1 - t0
    timings["materialise_s"] = timings.get("materialise_s", 0.0) + time.perf_counter() - t1
    S = s1 - s0
    return {"neighbours": nbr_QxKxR.reshape(S, C, k, R),
            "neighbour_ids": ids_QxK.reshape(S, C, k),
            "neighbour_dists": dists_QxK.reshape(S, C, k)}

  return sharded_rows(directory, split.num_sequences, max(1, QUERY_CHUNKS_PER_SHARD // C),
                      compute, desc=f"RETRO neighbours ({split.name})", unit="chunk",
                      units_per_row=C)


def realm_split(directory: Path, queries_NxE: np.ndarray, split: dataset.TokenSplit,
                store: dataset.TokenSplit, store_embeddings_NxE: np.ndarray, index, k: int,
                overfetch: int, metric: str, timings: dict[str, float] | None = None
                ) -> dict[str, np.ndarray]:
  """REALM candidates of every sequence of `split`: the query is its first chunk.

  `queries_NxE` holds one query per sequence (row s = sequence s); `store_embeddings_NxE`
  the datastore chunk embeddings the index was built on (saved as stale candidate vectors).
  """
  m, L = split.chunk_size, split.seq_len
  codes_D = doc_codes(split.doc_ids, store.doc_ids)
  chunk_doc_N = np.asarray(store.chunk_doc())
  timings = {} if timings is None else timings

  def compute(s0: int, s1: int) -> dict[str, np.ndarray]:
    starts = np.arange(s0, s1) * L
    t0 = time.perf_counter()
    ids_SxK, scores_SxK = retrieve(index, queries_NxE[s0:s1],
                                   query_docs(split.token_doc, codes_D, starts, starts + L),
                                   chunk_doc_N, k, overfetch, metric)
    t1 = time.perf_counter()
    live_SxK = ids_SxK >= 0
    vecs_SxKxE = np.asarray(store_embeddings_NxE[np.where(live_SxK, ids_SxK, 0)])
    out = {"candidate_ids": ids_SxK,
           "candidates": chunk_windows(store.tokens, store.token_doc, ids_SxK, m, m),
           "candidate_embeddings": np.where(live_SxK[..., None], vecs_SxKxE, 0).astype(np.float32),
           "candidate_scores": scores_SxK}
    timings["search_s"] = timings.get("search_s", 0.0) + t1 - t0
    timings["materialise_s"] = timings.get("materialise_s", 0.0) + time.perf_counter() - t1
    return out

  return sharded_rows(directory, split.num_sequences, QUERY_CHUNKS_PER_SHARD, compute,
                      desc=f"REALM candidates ({split.name})", unit="seq")


# --- Config-level builders (cached artifacts) -------------------------------------------

def load_datastore(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                   spec: str | None = None) -> Datastore:
  """The datastore `spec` (default: config.retrieval.datastore); "" = the training split.

  Another corpus (its first data.max_documents documents if that is set) is tokenised with
  the LM tokenizer and packed like a TokenSplit (each document followed by EOS), cached in
  `cache_root/datastores/<hash>/`.
  """
  spec = config.retrieval.datastore if spec is None else spec
  if not spec:
    return Datastore(spec="", split=prepared.train, hash=split_hash(prepared.train))
  d = config.data
  docs = corpora.load_corpus(spec, d.cache_dir, d.max_documents)
  dropped: list[str] = []
  if config.retrieval.datastore_drop_heldout:
    docs, dropped = drop_heldout(docs, prepared.validation.doc_ids)
    if not docs:
      raise UserError(f"every document of datastore {spec!r} matches a validation document "
                      f"by name; set --config.retrieval.datastore_drop_heldout=False or use "
                      f"another datastore")
    spec = f"{spec} (without {len(dropped)} held-out)"
  inputs = {"corpus": corpora.corpus_hash(docs), "tokenizer": prepared.tokenizer.hash}
  final = artifacts.cache_root(d.cache_dir) / "datastores" / artifacts.fingerprint(
      {**inputs, "format": _DATASTORE_FORMAT})
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      tokens_T, token_doc_T = _pack_documents(docs, prepared.tokenizer, spec)
      artifacts.atomic_save_npy(work / "datastore.tokens.npy", tokens_T)
      artifacts.atomic_save_npy(work / "datastore.token_doc.npy", token_doc_T)
      artifacts.atomic_write_text(work / "datastore.doc_ids.json",
                                  json.dumps([doc.doc_id for doc in docs]))
      artifacts.write_manifest(work, "datastore", inputs, spec=spec, documents=len(docs),
                               tokens=int(tokens_T.shape[0]), dropped_heldout=dropped)
  artifacts.check_manifest(final, inputs, rebuild_hint=f"delete {final} and rerun")
  split = dataset.TokenSplit.load(final, "datastore", d.seq_len, config.model.chunk_size)
  return Datastore(spec=spec, split=split, hash=split_hash(split))


def drop_heldout(docs: Sequence[corpora.Document], heldout_ids: Sequence[str]
                 ) -> tuple[list[corpora.Document], list[str]]:
  """(kept, dropped ids): drops documents whose name (the doc id after its last "/") is the
  name of a held-out document, e.g. `folio/othello` when `shakespeare/othello` is held out."""
  names = {doc_id.rsplit("/", 1)[-1] for doc_id in heldout_ids}
  kept, dropped = [], []
  for doc in docs:
    if doc.doc_id.rsplit("/", 1)[-1] in names:
      dropped.append(doc.doc_id)
    else:
      kept.append(doc)
  return kept, dropped


def _pack_documents(docs: Sequence[corpora.Document], tok: tokenizer_lib.Tokenizer, name: str
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [T], token_doc int32 [T]): every document's tokens, then EOS."""
  parts = []
  for start in tqdm(range(0, len(docs), 64), desc=f"tokenizing datastore {name}", unit="batch"):
    parts += [np.asarray(ids + [tok.eos_id], np.int32)
              for ids in tok.encode_batch([doc.text for doc in docs[start:start + 64]])]
  token_doc_T = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
  return np.concatenate(parts), token_doc_T


def load_embedder(config: ml_collections.ConfigDict) -> embedder_lib.Embedder:
  r = config.retrieval
  return embedder_lib.Embedder.load(r.embedder, r.embed_max_tokens, r.embed_batch_size)


def chunk_embeddings(config: ml_collections.ConfigDict, split: dataset.TokenSplit,
                     tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder
                     ) -> tuple[np.ndarray, str]:
  """(float32 [num_chunks, E] memmap, hash) of a split's chunks, cached and resumable."""
  key = artifacts.fingerprint({"chunks": split_hash(split), "embedder": embedder.hash,
                               "lm_tokenizer": tok.hash, "chunk_size": split.chunk_size})
  out = artifacts.cache_root(config.data.cache_dir) / "embeddings" / key
  return embedder.embed_chunks_to_file(split.chunk_tokens(), tok, out), key


def datastore_embeddings(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                         store: Datastore) -> np.ndarray:
  """The datastore chunks' embeddings [N, E] under the configured embedder (cached memmap)."""
  return chunk_embeddings(config, store.split, prepared.tokenizer, load_embedder(config))[0]


def datastore_index(config: ml_collections.ConfigDict, embeddings_NxE: np.ndarray,
                    embeddings_hash: str):
  """(FAISS index over the datastore embeddings, hash of it and its search settings).

  The index is built once per (embeddings, spec, metric, memory budget) and cached; the
  search settings (nprobe, ef_search) are applied when it is loaded.
  """
  r = config.retrieval
  spec = {"embeddings": embeddings_hash, "index": r.index, "metric": r.metric,
          "memory_budget_gb": r.memory_budget_gb}
  key = artifacts.fingerprint(spec)
  final = artifacts.cache_root(config.data.cache_dir) / "index" / key
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      index = index_lib.build_index(embeddings_NxE, r.metric, r.index,
                                    memory_budget_gb=r.memory_budget_gb, nprobe=r.nprobe,
                                    ef_search=r.ef_search)
      index_lib.save_index(index, work / "index.faiss")
      artifacts.write_manifest(work, "index", {"embeddings": embeddings_hash}, hash=key,
                               spec=spec, ntotal=int(index.ntotal))
  artifacts.check_manifest(final, {"embeddings": embeddings_hash},
                           rebuild_hint=f"delete {final} and rerun")
  return (index_lib.load_index(final / "index.faiss", r.nprobe, r.ef_search),
          artifacts.fingerprint({"index": key, "nprobe": r.nprobe, "ef_search": r.ef_search}))


def retrieval_inputs(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                     store: Datastore, embedder_hash: str, index_hash: str, kind: str,
                     splits: Sequence[str]) -> dict[str, str]:
  """Every input hash a RETRO/REALM artifact depends on (its manifest's `inputs`)."""
  r = config.retrieval
  k = r.num_neighbours if kind == RETRO else config.model.realm.num_candidates
  return {**prepared.hashes, "datastore": store.hash, "embedder": embedder_hash,
          "index": index_hash,
          "params": artifacts.fingerprint({"k": k, "overfetch": r.overfetch,
                                           "seq_len": config.data.seq_len,
                                           "chunk_size": config.model.chunk_size,
                                           "splits": sorted(splits)})}


def rebuild_hint(config: ml_collections.ConfigDict, directory: Path) -> str:
  return (f"rebuild with `python -m retrieval.build --config {config.name}` "
          f"(or delete {directory})")


def build_retrieval(config: ml_collections.ConfigDict, prepared: dataset.Prepared, kind: str,
                    store: Datastore | None = None,
                    splits: Sequence[str] = dataset.SPLITS) -> Retrieved:
  """RETRO neighbours (kind=RETRO) or REALM candidates (kind=REALM) of `splits`, cached.

  Embeds the datastore chunks (reused as the queries of the split it was made from) and
  the other splits' chunks, builds the index, then searches and materialises per split.
  """
  r = config.retrieval
  if kind not in (RETRO, REALM):
    raise ValueError(f"kind must be {RETRO!r} or {REALM!r}, got {kind!r}")
  if r.overfetch < 1 or r.num_neighbours < 1:
    raise UserError(f"retrieval.overfetch={r.overfetch} and retrieval.num_neighbours="
                    f"{r.num_neighbours} must be >= 1; set them to e.g. 4 and 2")
  if kind == RETRO and r.num_neighbours != config.model.num_neighbours:
    raise UserError(f"retrieval.num_neighbours={r.num_neighbours} differs from "
                    f"model.num_neighbours={config.model.num_neighbours}; set both to the same K")
  store = load_datastore(config, prepared) if store is None else store
  timings: dict[str, float] = {}
  embedder = load_embedder(config)
  if kind == REALM and embedder.dim != config.model.realm.embedding_dim:
    raise UserError(f"the embedder {r.embedder!r} makes {embedder.dim}-dim vectors but "
                    f"model.realm.embedding_dim={config.model.realm.embedding_dim}; set "
                    f"--config.model.realm.embedding_dim={embedder.dim}")
  t0 = time.perf_counter()
  store_NxE, store_emb_hash = chunk_embeddings(config, store.split, prepared.tokenizer, embedder)
  query_emb = {name: chunk_embeddings(config, prepared.split(name), prepared.tokenizer,
                                      embedder)[0] for name in splits}
  t1 = time.perf_counter()
  index, index_hash = datastore_index(config, store_NxE, store_emb_hash)
  timings.update(embed_s=t1 - t0, index_s=time.perf_counter() - t1)
  inputs = retrieval_inputs(config, prepared, store, embedder.hash, index_hash, kind, splits)
  final = artifacts.cache_root(config.data.cache_dir) / kind / artifacts.fingerprint(inputs)
  if artifacts.read_manifest(final) is None:
    print(f"building {kind} {final}", flush=True)
    with artifacts.building(final) as work:
      shapes, unfilled = {}, {}
      for name in splits:
        split = prepared.split(name)
        if kind == RETRO:
          arrays = retro_split(work / name, query_emb[name], split, store.split, index,
                               r.num_neighbours, r.overfetch, r.metric, timings)
          ids = arrays["neighbour_ids"]
        else:
          C = split.seq_len // split.chunk_size
          queries_SxE = query_emb[name][:split.num_sequences * C:C]
          arrays = realm_split(work / name, queries_SxE, split, store.split, store_NxE, index,
                               config.model.realm.num_candidates, r.overfetch, r.metric, timings)
          ids = arrays["candidate_ids"]
        shapes[name] = {key: list(a.shape) for key, a in arrays.items()}
        unfilled[name] = float(np.mean(np.asarray(ids) < 0))
      artifacts.write_manifest(work, kind, inputs, datastore=store.spec or "train split",
                               datastore_chunks=int(store.split.num_chunks), shapes=shapes,
                               unfilled_fraction=unfilled, metric=r.metric,
                               timings={key: round(v, 3) for key, v in timings.items()})
  else:
    print(f"reusing cached {kind} {final}", flush=True)
  return load_retrieved(final, inputs, rebuild_hint(config, final))


def load_retrieved(directory: str | os.PathLike, expected_inputs: Mapping[str, str],
                   hint: str) -> Retrieved:
  """A committed RETRO/REALM artifact, after checking its manifest against `expected_inputs`."""
  directory = Path(directory)
  manifest = artifacts.check_manifest(directory, expected_inputs, hint)
  arrays = {}
  for listing in sorted(directory.glob("*/arrays.json")):
    names = json.loads(listing.read_text())
    arrays[listing.parent.name] = {name: np.load(listing.parent / f"{name}.npy", mmap_mode="r")
                                   for name in names}
  return Retrieved(kind=manifest["kind"], arrays=arrays, directory=directory, manifest=manifest)


def retro_neighbours(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                     store: Datastore | None = None,
                     splits: Sequence[str] = dataset.SPLITS) -> Retrieved:
  """RETRO neighbours [num_seq, C, K, 2m] (+ ids, distances) of `splits` against `store`."""
  return build_retrieval(config, prepared, RETRO, store, splits)


def realm_candidates(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                     store: Datastore | None = None,
                     splits: Sequence[str] = dataset.SPLITS) -> Retrieved:
  """REALM candidates [num_seq, K, m] (+ ids, stale embeddings, scores) of `splits`."""
  return build_retrieval(config, prepared, REALM, store, splits)


# --- REALM stale-index refresh ------------------------------------------------------------

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
            embed_queries: Callable[[np.ndarray], np.ndarray], datastore: dataset.TokenSplit,
            stale_NxE: np.ndarray, splits: Mapping[str, dataset.TokenSplit], k: int, *,
            overfetch: int = 4,
            metric: str = "ip", index_spec: str = "auto", memory_budget_gb: float = 4.0,
            nprobe: int = 16, ef_search: int = 64, batch_size: int = 256) -> Retrieved:
  """Re-embeds the datastore with new encoders and recomputes REALM candidates (in memory).

  Args:
    embed_docs: (int32 [n, m] datastore chunks, float32 [n, E] their stale embeddings)
      -> float32 [n, E] (the document encoder).
    embed_queries: int32 [n, m] first chunks of sequences -> float32 [n, E] (query encoder).
      Both are called on batches of exactly `batch_size` rows (the last one zero-padded).
    datastore: the chunk table to re-embed and index.
    stale_NxE: its chunks' embeddings in the original index (what embed_docs starts from).
    splits: name -> split whose sequences get candidates.
    k: candidates per sequence; the other arguments configure the search as in the config.
  Returns:
    Retrieved(kind=REALM) of the new candidates; their `candidate_embeddings` are the stale
    ones, which the model's document encoder takes as input in the step.
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
    q_SxE = _embed_in_batches(embed_queries, (first_Sxm,), batch_size,
                              f"refresh: embed {name} queries")
    docs_SxJ = query_docs(split.token_doc, doc_codes(split.doc_ids, datastore.doc_ids),
                          starts, starts + L)
    ids_SxK, scores_SxK = retrieve(index, q_SxE, docs_SxJ, chunk_doc_N, k, overfetch, metric)
    live_SxK = ids_SxK >= 0
    out[name] = {
        "candidate_ids": ids_SxK,
        "candidates": chunk_windows(datastore.tokens, datastore.token_doc, ids_SxK, m, m),
        "candidate_embeddings": np.where(live_SxK[..., None],
                                         stale_NxE[np.where(live_SxK, ids_SxK, 0)], 0),
        "candidate_scores": scores_SxK}
  return Retrieved(kind=REALM, arrays=out)


# --- kNN-LM datastore -----------------------------------------------------------------------

class KnnDatastore:
  """kNN-LM keys (float16 [N, D], memmap) -> values (next token, int32 [N]), with an L2 index."""

  def __init__(self, directory: Path, manifest: dict, nprobe: int = 16, ef_search: int = 64):
    self.directory = directory
    self.manifest = manifest
    self.keys = np.load(directory / "keys.npy", mmap_mode="r")
    self.values = np.load(directory / "values.npy", mmap_mode="r")
    self.index = index_lib.load_index(directory / "index.faiss", nprobe, ef_search)

  @classmethod
  def load(cls, directory: str | os.PathLike, expected_inputs: Mapping[str, str], hint: str,
           nprobe: int = 16, ef_search: int = 64) -> KnnDatastore:
    """Opens a committed datastore whose manifest matches `expected_inputs` (else UserError)."""
    directory = Path(directory)
    manifest = artifacts.check_manifest(directory, expected_inputs, hint)
    return cls(directory, manifest, nprobe, ef_search)

  def search(self, queries_NxD: np.ndarray, k: int, exact: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances float32 [N, k], next tokens int32 [N, k]), nearest first.

    exact=True recomputes the distances from the stored keys (the index may be
    approximate) and re-sorts. Missing hits have distance +inf and token 0.
    """
    q_NxD = np.ascontiguousarray(queries_NxD, np.float32)
    dists_NxK, ids_NxK = index_lib.search(self.index, q_NxD, k)
    live_NxK = ids_NxK >= 0
    safe_NxK = np.where(live_NxK, ids_NxK, 0)
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
                        memory_budget_gb: float = 4.0, nprobe: int = 16, ef_search: int = 64
                        ) -> KnnDatastore:
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

    arrays = sharded_rows(work, split.num_sequences, KNN_SEQUENCES_PER_SHARD, compute,
                          desc=f"kNN-LM keys ({split.name})", unit="tok",
                          units_per_row=split.seq_len)
    n, d = arrays["keys"].shape
    factory = (index_lib.choose_factory(n, d, memory_budget_gb) if index_spec == "auto"
               else index_spec)
    index = index_lib.build_index(arrays["keys"], "l2", factory,  # float16 memmap, batched
                                  memory_budget_gb=memory_budget_gb, nprobe=nprobe,
                                  ef_search=ef_search)
    index_lib.save_index(index, work / "index.faiss")
    artifacts.write_manifest(work, KNN, inputs, entries=int(arrays["keys"].shape[0]),
                             key_dim=int(arrays["keys"].shape[1]), keys_dtype="float16",
                             values_dtype="int32", metric="l2", index_spec=factory,
                             split=split.name)
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
  directory = artifacts.cache_root(config.data.cache_dir) / KNN / artifacts.fingerprint(inputs)
  return build_knn_datastore(keys_fn, prepared.split(split), directory, inputs,
                             batch_size=config.eval.batch_size, index_spec=r.index,
                             memory_budget_gb=r.memory_budget_gb, nprobe=r.nprobe,
                             ef_search=r.ef_search)
