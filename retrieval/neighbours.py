"""Neighbours of query windows: for every sequence of a split, the K nearest datastore
chunks of each of its query windows (RETRO; In-Context RALM).

    arrays = neighbours_split(directory, queries_NxE, split, store.split, index, request,
                              overfetch, metric)

A request (`models.family.RetrievalSpec`, kind "neighbours") carries (k, length, stride,
query_len). A sequence of length L has W = L / stride query windows: window i is the tokens
[(i+1)*stride - query_len, (i+1)*stride) of the sequence, clipped at the sequence start
(a shorter query). Its K neighbours are datastore chunks, each materialised as `length`
tokens from the chunk's start, or with `align` from the shift that lines the chunk up with
the window's last m tokens (`core.chunk_windows`, `core.align_offsets`):

    neighbours int32 [S, W, K, length], neighbour_ids int64 [S, W, K] (-1 = none),
    neighbour_dists float32 [S, W, K]

Excluded are chunks of the document of the window's first token and of token
(i+2)*stride (the end of the block the neighbours serve; its future tokens come from it).
RETRO is stride = query_len = chunk_size m and length 2m: the windows are then exactly the
split's chunks, whose cached chunk embeddings are the queries (nothing is re-embedded).
Other windows are embedded with the embedder (left padding stripped) and cached in
`cache_root/window_embeddings/<hash>/` (keyed by the split, embedder, tokenizer, seq_len,
stride and query_len), resumably. The artifact kind is "retro_neighbours" for every
neighbours request (the name of its cache folder and of its manifest).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np

from common import artifacts
from common.errors import UserError
from data import dataset
from data import tokenizer as tokenizer_lib
from models import family
from retrieval import core
from retrieval import datastore as datastore_lib
from retrieval import embedder as embedder_lib
from retrieval import shards

ARTIFACT = "retro_neighbours"  # cache kind of every neighbours artifact
IDS = "neighbour_ids"  # the array whose -1 entries are unfilled neighbours
QUERY_CHUNKS_PER_SHARD = 4096  # query windows per resumable shard of the search
WINDOWS_PER_EMBED_SHARD = 16384  # query windows per resumable shard of their embedding


def query_windows(seq_len: int, stride: int, query_len: int, s0: int, s1: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(first token, end token (exclusive)) int64 [(s1-s0) * W] of the query windows of
  sequences s0..s1-1 in the split's stream, window-major within a sequence."""
  return sequence_windows(seq_len, stride, query_len, np.arange(s0, s1, dtype=np.int64))


def sequence_windows(seq_len: int, stride: int, query_len: int, seq_S: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`query_windows` of the sequences `seq_S` (any indices)."""
  W = seq_len // stride
  seq_start_Sx1 = (np.asarray(seq_S, np.int64) * seq_len)[:, None]
  end_SxW = seq_start_Sx1 + (np.arange(W, dtype=np.int64) + 1) * stride
  first_SxW = np.maximum(end_SxW - query_len, seq_start_Sx1)
  return first_SxW.reshape(-1), end_SxW.reshape(-1)


def uses_chunk_embeddings(request: family.RetrievalSpec, chunk_size: int) -> bool:
  """Whether the query windows are exactly the split's chunks (RETRO)."""
  return request.stride == request.query_len == chunk_size


def check(config: ml_collections.ConfigDict, request: family.RetrievalSpec,
          embedder: embedder_lib.Embedder) -> None:
  """UserError unless the request's windows tile `data.seq_len`."""
  L = config.data.seq_len
  if min(request.stride, request.query_len, request.length) < 1 or L % request.stride:
    raise UserError(f"the model requests neighbours with stride={request.stride}, query_len="
                    f"{request.query_len}, length={request.length}: each must be >= 1 and the "
                    f"stride must divide data.seq_len={L}; change data.seq_len or "
                    f"model.chunk_size")


def window_embeddings(config: ml_collections.ConfigDict, split: dataset.TokenSplit,
                      tok: tokenizer_lib.Tokenizer, embedder: embedder_lib.Embedder,
                      stride: int, query_len: int) -> np.ndarray:
  """float32 [S, W, E] memmap: the embeddings of every query window, cached and resumable.

  A window clipped at its sequence start is embedded without its left padding; an
  all-padding window gets the zero vector.
  """
  L, S = split.seq_len, split.num_sequences
  W = L // stride
  inputs = {"split": datastore_lib.split_hash(split), "embedder": embedder.hash,
            "lm_tokenizer": tok.hash, "seq_len": L, "stride": stride, "query_len": query_len}
  final = (artifacts.cache_root(config.data.cache_dir) / "window_embeddings"
           / artifacts.fingerprint(inputs))

  def compute(s0: int, s1: int, bar) -> dict[str, np.ndarray]:
    first_Q, end_Q = query_windows(L, stride, query_len, s0, s1)
    out_QxE = np.zeros((len(first_Q), embedder.dim), np.float32)
    texts, live = [], []
    for q, (a, b) in enumerate(zip(first_Q, end_Q)):
      ids = np.asarray(split.tokens[a:b])
      if ids.any():
        texts.append(tok.decode(ids.tolist()))
        live.append(q)
    bar.update(len(first_Q) - len(live))
    out_QxE[live] = embedder.embed_texts(texts, bar)
    return {"embeddings": out_QxE.reshape(s1 - s0, W, embedder.dim)}

  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      shards.sharded_rows(work, S, max(1, WINDOWS_PER_EMBED_SHARD // W), compute,
                          desc=f"embed query windows ({split.name})", unit="window",
                          units_per_row=W, job=inputs, compute_advances_bar=True)
      artifacts.write_manifest(work, "window_embeddings", inputs, shape=[S, W, embedder.dim],
                               dtype="float32")
  artifacts.check_manifest(final, inputs, rebuild_hint=f"delete {final} and rerun",
                           rebuild=artifacts.rebuild_command(config.name))
  return np.load(final / "embeddings.npy", mmap_mode="r")


def queries(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
            split: dataset.TokenSplit, embedder: embedder_lib.Embedder,
            request: family.RetrievalSpec) -> np.ndarray:
  """float32 [>= S*W, E]: row s*W + i embeds query window i of sequence s."""
  if uses_chunk_embeddings(request, split.chunk_size):
    return datastore_lib.chunk_embeddings(config, split, prepared.tokenizer, embedder)[0]
  emb_SxWxE = window_embeddings(config, split, prepared.tokenizer, embedder, request.stride,
                                request.query_len)
  return emb_SxWxE.reshape(-1, emb_SxWxE.shape[-1])


def query_tokens(tokens_T: np.ndarray, first_Q: np.ndarray, end_Q: np.ndarray, m: int
                 ) -> np.ndarray:
  """int32 [Q, m]: the last m tokens of each query window, left-padded with 0 where the
  window (clipped at its sequence start) is shorter: what `core.align_offsets` matches."""
  pos_QxM = end_Q[:, None] - m + np.arange(m)
  keep_QxM = pos_QxM >= first_Q[:, None]
  return np.where(keep_QxM, np.asarray(tokens_T[np.maximum(pos_QxM, 0)]), 0).astype(np.int32)


def neighbour_rows(queries_NxE: np.ndarray, split: dataset.TokenSplit,
                   store: dataset.TokenSplit, index, request: family.RetrievalSpec,
                   overfetch: int, metric: str, align: bool = False,
                   timings: dict[str, float] | None = None
                   ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """rows(seq_S) -> the neighbour arrays (`neighbours_split`) of the sequences seq_S."""
  k, R, stride = request.k, request.length, request.stride
  L = split.seq_len
  W = L // stride
  if len(queries_NxE) < split.num_sequences * W:
    raise ValueError(f"{len(queries_NxE)} queries for {split.num_sequences} sequences of {W} "
                     f"windows")
  codes_D = core.doc_codes(split.doc_ids, store.doc_ids)
  chunk_doc_N = np.asarray(store.chunk_doc())
  timings = {} if timings is None else timings

  def rows(seq_S: np.ndarray) -> dict[str, np.ndarray]:
    seq_S = np.asarray(seq_S, np.int64)
    first_Q, end_Q = sequence_windows(L, stride, request.query_len, seq_S)
    t0 = time.perf_counter()
    ids_QxK, dists_QxK = core.retrieve(
        index, np.asarray(queries_NxE[(seq_S[:, None] * W + np.arange(W)).reshape(-1)]),
        core.query_docs(split.token_doc, codes_D, first_Q, end_Q + stride), chunk_doc_N, k,
        overfetch, metric)
    t1 = time.perf_counter()
    m = store.chunk_size
    query_QxM = query_tokens(split.tokens, first_Q, end_Q, m) if align else None
    nbr_QxKxR = core.chunk_windows(store.tokens, store.token_doc, ids_QxK, m, R, query_QxM)
    timings["search_s"] = timings.get("search_s", 0.0) + t1 - t0
    timings["materialise_s"] = timings.get("materialise_s", 0.0) + time.perf_counter() - t1
    S = len(seq_S)
    return {"neighbours": nbr_QxKxR.reshape(S, W, k, R),
            "neighbour_ids": ids_QxK.reshape(S, W, k),
            "neighbour_dists": dists_QxK.reshape(S, W, k)}

  return rows


def neighbours_split(directory: Path, queries_NxE: np.ndarray, split: dataset.TokenSplit,
                     store: dataset.TokenSplit, index, request: family.RetrievalSpec,
                     overfetch: int, metric: str, align: bool = False,
                     timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """Neighbours of every query window of every sequence of `split` (resumable: shards.py).

  Args:
    directory: where `neighbours.npy`, `neighbour_ids.npy`, `neighbour_dists.npy` go.
    queries_NxE: query embeddings, row s*W + i = window i of sequence s (at least S*W rows;
      for RETRO the split's chunk embeddings).
    split: the query split; store: the datastore (the chunk table `index` was built on).
    request: k, length, stride, query_len (see the module docstring).
    align: start each neighbour at the shift that lines it up with its query window's last
      chunk (`core.align_offsets`; `retrieval.align_neighbours`).
    timings: if given, seconds spent searching and materialising are added to it.
  """
  rows = neighbour_rows(queries_NxE, split, store, index, request, overfetch, metric, align,
                        timings)
  W = split.seq_len // request.stride
  return shards.sharded_rows(directory, split.num_sequences,
                             max(1, QUERY_CHUNKS_PER_SHARD // W),
                             lambda s0, s1: rows(np.arange(s0, s1)),
                             desc=f"neighbours ({split.name})", unit="window", units_per_row=W)


def rows(config: ml_collections.ConfigDict, request: family.RetrievalSpec,
         split: dataset.TokenSplit, queries_NxE: np.ndarray, store: datastore_lib.Datastore,
         store_NxE: np.ndarray, index, timings: dict[str, float]
         ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """The builder's row function (build.py, patch.py): `neighbour_rows` with the config's
  settings."""
  r = config.retrieval
  return neighbour_rows(queries_NxE, split, store.split, index, request, r.overfetch, r.metric,
                        r.align_neighbours, timings)


def search(config: ml_collections.ConfigDict, request: family.RetrievalSpec, directory: Path,
           split: dataset.TokenSplit, queries_NxE: np.ndarray,
           store: datastore_lib.Datastore, store_NxE: np.ndarray, index,
           timings: dict[str, float]) -> dict[str, np.ndarray]:
  """The builder's search step (build.py): `neighbours_split` with the config's settings."""
  r = config.retrieval
  return neighbours_split(directory, queries_NxE, split, store.split, index, request,
                          r.overfetch, r.metric, r.align_neighbours, timings)
