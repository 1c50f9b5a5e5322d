"""The datastore: what is retrieved from, its chunk embeddings and its FAISS index.

    store = load_datastore(config, prepared)          # the training split or another corpus
    embedder = load_embedder(config)
    store_NxE, emb_hash, index, index_hash = store_vectors(config, prepared, store, embedder)

The datastore is a packed chunk table (a `TokenSplit`): by default the training split, so
the training queries are exactly the datastore chunks and their embeddings are computed
once. Another corpus (`retrieval.datastore`) is tokenised with the LM tokenizer and packed
the same way. Artifacts live in `cache_root/<kind>/<fingerprint of inputs>/` with a
manifest of input hashes: `datastores` (another corpus, packed), `embeddings` (chunk
embeddings, resumable: embedder.py) and `index` (FAISS; search settings applied on load).
A version edited from another (`retrieval.edit`: documents removed or added) reuses its
parent's embeddings and trained index structure (`store_vectors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import ml_collections
import numpy as np

from common import artifacts
from common.errors import UserError
from data import corpora
from data import dataset
from data import tokenizer as tokenizer_lib
from retrieval import embedder as embedder_lib
from retrieval import hash_embedder
from retrieval import index as index_lib
from retrieval import ondisk
from retrieval import pipeline

_DATASTORE_FORMAT = "packed-v2"  # v2: every document starts a chunk (editable by document)
TRAIN_DOCUMENTS = "split:train"  # the training split's documents as an editable datastore
PARENT_CHUNKS = "parent_chunk.npy"  # an edited version: each chunk's id in its parent (-1: new)


@dataclasses.dataclass(frozen=True)
class Datastore:
  """The retrieval corpus: a packed chunk table and the hash of its contents (its version).

  A packed datastore (`directory`) pads every document to whole chunks, so a document's
  chunks are its own and it can be removed or added without touching the others
  (`retrieval.edit`); `edits` is its log of such edits, oldest first.
  """

  spec: str  # "" = the training split of data.corpus; else a corpus spec
  split: dataset.TokenSplit
  hash: str
  directory: Path | None = None  # the committed packed datastore; None: the training split
  edits: tuple[dict, ...] = ()


def split_hash(split: dataset.TokenSplit) -> str:
  """Hash of a packed split's contents (tokens, token documents, doc ids)."""
  h = hashlib.sha256()
  for array in (split.tokens, split.token_doc):
    h.update(np.ascontiguousarray(array, np.int32).tobytes())
  h.update(json.dumps(list(split.doc_ids)).encode())
  return h.hexdigest()[:16]


def load_datastore(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                   spec: str | None = None) -> Datastore:
  """The datastore `spec` (default: config.retrieval.datastore); "" = the training split.

  Another corpus (its first data.max_documents documents if that is set; `split:train`: the
  training split's documents) is tokenised with the LM tokenizer and packed like a
  TokenSplit (each document followed by EOS and padded to whole chunks), cached in
  `cache_root/datastores/<hash>/`. A spec that names such a committed directory (a run
  bundle's, or a version written by `retrieval.edit`) is used as it is.
  """
  spec = config.retrieval.datastore if spec is None else spec
  if not spec:
    return Datastore(spec="", split=prepared.train, hash=split_hash(prepared.train))
  final = artifacts.committed(spec, "datastore")
  if final is None:
    final = _pack_corpus(config, prepared, spec)
  manifest = artifacts.check_manifest(final, {"tokenizer": prepared.tokenizer.hash},
                                      rebuild_hint="use the data.tokenizer that built it")
  split = dataset.TokenSplit.load(final, "datastore", config.data.seq_len,
                                  config.model.chunk_size)
  return Datastore(spec=manifest["spec"], split=split, hash=split_hash(split),
                   directory=final, edits=tuple(manifest.get("edits", ())))


def _pack_corpus(config: ml_collections.ConfigDict, prepared: dataset.Prepared, spec: str
                 ) -> Path:
  """The committed packed datastore of corpus `spec`, built if missing."""
  d = config.data
  dropped: list[str] = []
  train_documents = spec == TRAIN_DOCUMENTS
  docs, _ = corpora.scan(d.corpus if train_documents else spec, d.cache_dir, d.max_documents)
  if train_documents:  # in corpus order, as the stream yields them
    train = set(prepared.train.doc_ids)
    docs = dataclasses.replace(docs, doc_ids=tuple(i for i in docs.doc_ids if i in train))
    spec = f"{d.corpus} (training documents)"
  elif config.retrieval.datastore_drop_heldout:
    heldout = [i for name in prepared.names if name != "train"
               for i in prepared.split(name).doc_ids]
    kept, dropped = drop_heldout(docs.doc_ids, heldout)
    if not kept:
      raise UserError(f"every document of datastore {spec!r} matches a held-out document "
                      f"by name; set --config.retrieval.datastore_drop_heldout=False or use "
                      f"another datastore")
    docs = dataclasses.replace(docs, doc_ids=tuple(kept))
    spec = f"{spec} (without {len(dropped)} held-out)"
  m = config.model.chunk_size
  inputs = {"corpus": corpora.corpus_hash(docs), "tokenizer": prepared.tokenizer.hash}
  final = artifacts.cache_root(d.cache_dir) / "datastores" / artifacts.fingerprint(
      {**inputs, "format": _DATASTORE_FORMAT, "chunk_size": m})
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      counts = dataset.pack(docs, prepared.tokenizer, work, "datastore", align=m)
      write_datastore_manifest(work, inputs, spec, m, dropped_heldout=dropped, **counts)
  artifacts.check_manifest(final, inputs, rebuild_hint=f"delete {final} and rerun",
                           rebuild=artifacts.rebuild_command(config.name))
  return final


def write_datastore_manifest(work: Path, inputs: dict[str, str], spec: str, chunk_size: int,
                             parent: str | None = None, edits: Sequence[dict] = (),
                             **extra: object) -> dict:
  """The manifest of a packed datastore in `work`: its version (`split_hash` of its
  contents), the version it was edited from and the edit log (`retrieval.edit`)."""
  split = dataset.TokenSplit.load(work, "datastore", 1, chunk_size)
  return artifacts.write_manifest(work, "datastore", inputs, spec=spec, format=_DATASTORE_FORMAT,
                                  chunk_size=chunk_size, version=split_hash(split),
                                  parent=parent, edits=list(edits), **extra)


@dataclasses.dataclass(frozen=True)
class Parent:
  """The version an edited datastore was made from, and where its chunks came from."""

  store: Datastore
  chunk_N: np.ndarray  # int64 [N]: chunk n of the edited version is chunk_N[n] here (-1: added)


def parent_of(config: ml_collections.ConfigDict, prepared: dataset.Prepared, store: Datastore
              ) -> Parent | None:
  """The parent of an edited version (`retrieval.edit`), or None (not edited, or its parent
  was deleted: then everything is built afresh)."""
  if store.directory is None or not (store.directory / PARENT_CHUNKS).is_file():
    return None
  parent = artifacts.read_manifest(store.directory).get("parent")
  if not parent or artifacts.committed(parent, "datastore") is None:
    return None
  return Parent(load_datastore(config, prepared, parent),
                np.load(store.directory / PARENT_CHUNKS, mmap_mode="r"))


def is_editable(store: Datastore) -> bool:
  """Whether every document of `store` starts a chunk (packed-v2), so documents can be
  removed and added by whole chunks."""
  if store.directory is None:
    return False
  manifest = artifacts.read_manifest(store.directory) or {}
  return manifest.get("format") == _DATASTORE_FORMAT


def drop_heldout(doc_ids: Sequence[str], heldout_ids: Sequence[str]
                 ) -> tuple[list[str], list[str]]:
  """(kept, dropped) ids: drops documents whose name (the doc id after its last "/") is the
  name of a held-out document, e.g. `folio/othello` when `shakespeare/othello` is held out."""
  names = {doc_id.rsplit("/", 1)[-1] for doc_id in heldout_ids}
  kept, dropped = [], []
  for doc_id in doc_ids:
    (dropped if doc_id.rsplit("/", 1)[-1] in names else kept).append(doc_id)
  return kept, dropped


def leakage(store: dataset.TokenSplit, split: dataset.TokenSplit) -> dict[str, object]:
  """What of `split` (an evaluated split) the datastore `store` holds verbatim: the doc ids
  they share, and how many of the split's chunks (m tokens, no padding) occur as a chunk of
  the datastore's stream at any offset. Another edition (`folio/othello` for
  `shakespeare/othello`) shares neither; the evaluated text itself shares both."""
  m = split.chunk_size
  shared = sorted(set(store.doc_ids) & set(split.doc_ids))
  tokens = np.asarray(store.tokens, np.int64)
  if len(tokens) < m or split.num_chunks == 0:
    return {"shared_doc_ids": shared, "verbatim_chunks": 0, "chunks": split.num_chunks}
  # Polynomial hash (wrapping mod 2^64) of every m-token window of the datastore's stream,
  # and of the split's chunks: equal windows have equal hashes.
  def hashes(rows_NxM_view: Callable[[int], np.ndarray], n: int) -> np.ndarray:
    h_N = np.zeros(n, np.uint64)
    for j in range(m):
      h_N = h_N * np.uint64(1_000_003) + rows_NxM_view(j).astype(np.uint64)
    return h_N

  n = len(tokens) - m + 1
  store_hashes = np.unique(hashes(lambda j: tokens[j:j + n], n))
  chunks_NxM = np.asarray(split.chunk_tokens(), np.int64)
  chunk_hashes = hashes(lambda j: chunks_NxM[:, j], len(chunks_NxM))
  return {"shared_doc_ids": shared,
          "verbatim_chunks": int(np.isin(chunk_hashes, store_hashes).sum()),
          "chunks": int(len(chunks_NxM))}


def load_embedder(config: ml_collections.ConfigDict) -> embedder_lib.Embedder:
  """The configured embedder (`hashing:<dim>`: hash_embedder.py), sent to pipeline workers
  as its loader and arguments."""
  r = config.retrieval
  if r.embedder.startswith(hash_embedder.PREFIX):
    load, args = hash_embedder.HashEmbedder.from_spec, (r.embedder,)
  else:
    load, args = embedder_lib.Embedder.load, (r.embedder, r.embed_max_tokens, r.embed_batch_size)
  return pipeline.by_reference(load(*args), load, *args)


def chunk_embeddings(config: ml_collections.ConfigDict, split: dataset.TokenSplit,
                     tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder,
                     reuse: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, str]:
  """(float32 [num_chunks, E] memmap, hash) of a split's chunks, cached and resumable;
  `reuse`: rows already embedded (`Embedder.embed_chunks_to_file`)."""
  out = _embeddings_dir(config, split, tok, embedder)
  return embedder.embed_chunks_to_file(split.chunk_tokens(), tok, out,
                                       rebuild=artifacts.rebuild_command(config.name),
                                       reuse=reuse), out.name


def _embeddings_dir(config: ml_collections.ConfigDict, split: dataset.TokenSplit,
                    tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder) -> Path:
  key = artifacts.fingerprint({"chunks": split_hash(split), "embedder": embedder.hash,
                               "lm_tokenizer": tok.hash, "chunk_size": split.chunk_size})
  return artifacts.cache_root(config.data.cache_dir) / "embeddings" / key


def _embedded(config: ml_collections.ConfigDict, split: dataset.TokenSplit,
              tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder) -> bool:
  return artifacts.read_manifest(_embeddings_dir(config, split, tok, embedder)) is not None


def datastore_embeddings(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                         store: Datastore) -> np.ndarray:
  """The datastore chunks' embeddings [N, E] under the configured embedder (cached memmap)."""
  return store_embeddings(config, prepared, store, load_embedder(config),
                          parent_of(config, prepared, store))[0]


def store_embeddings(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                     store: Datastore, embedder: embedder_lib.Embedder, parent: Parent | None
                     ) -> tuple[np.ndarray, str]:
  """`chunk_embeddings` of the datastore; an edited version (`parent`: `parent_of(store)`)
  embeds only its added chunks (the rest are its parent's rows, under the same cache key a
  fresh build computes)."""
  reuse = None
  if parent is not None and not _embedded(config, store.split, prepared.tokenizer, embedder):
    reuse = (parent.chunk_N, store_embeddings(config, prepared, parent.store, embedder,
                                              parent_of(config, prepared, parent.store))[0])
  return chunk_embeddings(config, store.split, prepared.tokenizer, embedder, reuse)


def store_index(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                embedder: embedder_lib.Embedder, embeddings_NxE: np.ndarray, embeddings_hash: str,
                parent: Parent | None) -> tuple[object, str]:
  """`datastore_index` of the datastore; an edited version's (`parent`: `parent_of`) is
  made from its parent's."""
  edited = None
  if parent is not None:
    n = parent.store.split.num_chunks
    appended = len(parent.chunk_N) >= n and np.array_equal(parent.chunk_N[:n], np.arange(n))
    edited = EditedFrom(lambda: store_vectors(config, prepared, parent.store, embedder)[2:],
                        n, appended)
  return datastore_index(config, embeddings_NxE, embeddings_hash, edited)


def store_vectors(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                  store: Datastore, embedder: embedder_lib.Embedder
                  ) -> tuple[np.ndarray, str, object, str]:
  """(embeddings [N, E], their hash, FAISS index, its hash) of the datastore, its parent
  looked up once (`store_embeddings`, `store_index`)."""
  parent = parent_of(config, prepared, store)
  store_NxE, emb_hash = store_embeddings(config, prepared, store, embedder, parent)
  return (store_NxE, emb_hash,
          *store_index(config, prepared, embedder, store_NxE, emb_hash, parent))


class EditedFrom(NamedTuple):
  """The index of the version a datastore was edited from (`datastore_index`)."""

  index: Callable[[], tuple[object, str]]  # () -> (its index, its hash)
  chunks: int  # the parent's chunk count
  appended: bool  # the edit only appended chunks


def datastore_index(config: ml_collections.ConfigDict, embeddings_NxE: np.ndarray,
                    embeddings_hash: str, edited: EditedFrom | None = None):
  """(FAISS index over the datastore embeddings, hash of it and its search settings).

  The index is built once per (embeddings, spec, metric, memory budget) and cached; the
  search settings (nprobe, ef_search) are applied when it is loaded. `edited` makes it from
  the index of the version this one was edited from (`retrieval.edit`), when both are of
  the same kind (`retrieval.index` "auto" chooses by size): an append adds only
  the new vectors to a copy; otherwise a trained index (IVF centroids, PQ codebooks) is
  emptied and refilled, not retrained, and a Flat or HNSW one, which trains nothing, is
  built afresh. A Flat index is then what a fresh build of the edited corpus makes and
  shares its cache key; the others are cached under a key naming their parent. On-disk
  inverted lists are built afresh.
  """
  r = config.retrieval
  spec = {"embeddings": embeddings_hash, "index": r.index, "metric": r.metric,
          "memory_budget_gb": r.memory_budget_gb}
  n, d = embeddings_NxE.shape
  factory = lambda count: (index_lib.choose_factory(count, d, r.memory_budget_gb)  # noqa: E731
                           if r.index == "auto" else r.index)
  from_parent = (edited is not None and not r.index.startswith(ondisk.PREFIX)
                 and factory(edited.chunks) == factory(n)
                 and (edited.appended or "IVF" in factory(n)))
  parent = None
  if from_parent and factory(n) != "Flat":  # not what a fresh build makes: keyed by parent
    parent = edited.index()
    spec["trained_by"] = parent[1]
  key = artifacts.fingerprint(spec)
  final = artifacts.cache_root(config.data.cache_dir) / "index" / key
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      if r.index.startswith(ondisk.PREFIX):  # inverted lists on disk, filled by the pipeline
        ondisk.build_ondisk(embeddings_NxE, r.index, r.metric, work)
        ntotal = ondisk.load_ondisk(work).ntotal
      else:
        if from_parent:
          parent = parent or edited.index()
          index = index_lib.refill(parent[0], embeddings_NxE, r.nprobe, r.ef_search,
                                   start=edited.chunks if edited.appended else 0)
        else:
          index = index_lib.build_index(embeddings_NxE, r.metric, r.index,
                                        memory_budget_gb=r.memory_budget_gb, nprobe=r.nprobe,
                                        ef_search=r.ef_search)
        index_lib.save_index(index, work / "index.faiss")
        ntotal = index.ntotal
      artifacts.write_manifest(work, "index", {"embeddings": embeddings_hash}, hash=key,
                               spec=spec, ntotal=int(ntotal))
  artifacts.check_manifest(final, {"embeddings": embeddings_hash},
                           rebuild_hint=f"delete {final} and rerun",
                           rebuild=artifacts.rebuild_command(config.name))
  load, args = ((ondisk.load_ondisk, (final, r.nprobe, r.ef_search))
                if r.index.startswith(ondisk.PREFIX)
                else (index_lib.load_index, (final / "index.faiss", r.nprobe, r.ef_search)))
  return (pipeline.by_reference(load(*args), load, *args),
          artifacts.fingerprint({"index": key, "nprobe": r.nprobe, "ef_search": r.ef_search}))
