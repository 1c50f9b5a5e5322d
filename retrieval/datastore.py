"""The datastore: what is retrieved from, its chunk embeddings and its FAISS index.

    store = load_datastore(config, prepared)          # the training split or another corpus
    embedder = load_embedder(config)
    store_NxE, emb_hash = chunk_embeddings(config, store.split, prepared.tokenizer, embedder)
    index, index_hash = datastore_index(config, store_NxE, emb_hash)

The datastore is a packed chunk table (a `TokenSplit`): by default the training split, so
the training queries are exactly the datastore chunks and their embeddings are computed
once. Another corpus (`retrieval.datastore`) is tokenised with the LM tokenizer and packed
the same way. Artifacts live in `cache_root/<kind>/<fingerprint of inputs>/` with a
manifest of input hashes: `datastores` (another corpus, packed), `embeddings` (chunk
embeddings, resumable: embedder.py) and `index` (FAISS; search settings applied on load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

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

_DATASTORE_FORMAT = "packed-v1"


@dataclasses.dataclass(frozen=True)
class Datastore:
  """The retrieval corpus: a packed chunk table and the hash of its contents."""

  spec: str  # "" = the training split of data.corpus; else a corpus spec
  split: dataset.TokenSplit
  hash: str


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

  Another corpus (its first data.max_documents documents if that is set) is tokenised with
  the LM tokenizer and packed like a TokenSplit (each document followed by EOS), cached in
  `cache_root/datastores/<hash>/`. A spec that names such a committed directory (a run
  bundle's) is used as it is.
  """
  spec = config.retrieval.datastore if spec is None else spec
  if not spec:
    return Datastore(spec="", split=prepared.train, hash=split_hash(prepared.train))
  final = artifacts.committed(spec, "datastore")
  if final is None:
    final, spec = _pack_corpus(config, prepared, spec)
  else:
    spec = artifacts.check_manifest(final, {"tokenizer": prepared.tokenizer.hash},
                                    rebuild_hint="use the data.tokenizer that built it")["spec"]
  split = dataset.TokenSplit.load(final, "datastore", config.data.seq_len,
                                  config.model.chunk_size)
  return Datastore(spec=spec, split=split, hash=split_hash(split))


def _pack_corpus(config: ml_collections.ConfigDict, prepared: dataset.Prepared, spec: str
                 ) -> tuple[Path, str]:
  """(the committed packed datastore of corpus `spec`, built if missing; its description)."""
  d = config.data
  docs, _ = corpora.scan(spec, d.cache_dir, d.max_documents)
  dropped: list[str] = []
  if config.retrieval.datastore_drop_heldout:
    heldout = [i for name in prepared.names if name != "train"
               for i in prepared.split(name).doc_ids]
    kept, dropped = drop_heldout(docs.doc_ids, heldout)
    if not kept:
      raise UserError(f"every document of datastore {spec!r} matches a held-out document "
                      f"by name; set --config.retrieval.datastore_drop_heldout=False or use "
                      f"another datastore")
    docs = dataclasses.replace(docs, doc_ids=tuple(kept))
    spec = f"{spec} (without {len(dropped)} held-out)"
  inputs = {"corpus": corpora.corpus_hash(docs), "tokenizer": prepared.tokenizer.hash}
  final = artifacts.cache_root(d.cache_dir) / "datastores" / artifacts.fingerprint(
      {**inputs, "format": _DATASTORE_FORMAT})
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      counts = dataset.pack(docs, prepared.tokenizer, work, "datastore")
      artifacts.write_manifest(work, "datastore", inputs, spec=spec, **counts,
                               dropped_heldout=dropped)
  artifacts.check_manifest(final, inputs, rebuild_hint=f"delete {final} and rerun",
                           rebuild=artifacts.rebuild_command(config.name))
  return final, spec


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
                     tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder
                     ) -> tuple[np.ndarray, str]:
  """(float32 [num_chunks, E] memmap, hash) of a split's chunks, cached and resumable."""
  key = artifacts.fingerprint({"chunks": split_hash(split), "embedder": embedder.hash,
                               "lm_tokenizer": tok.hash, "chunk_size": split.chunk_size})
  out = artifacts.cache_root(config.data.cache_dir) / "embeddings" / key
  return embedder.embed_chunks_to_file(split.chunk_tokens(), tok, out,
                                       rebuild=artifacts.rebuild_command(config.name)), key


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
      if r.index.startswith(ondisk.PREFIX):  # inverted lists on disk, filled by the pipeline
        ondisk.build_ondisk(embeddings_NxE, r.index, r.metric, work)
        ntotal = ondisk.load_ondisk(work).ntotal
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
