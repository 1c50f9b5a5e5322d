"""Sample text from a checkpoint, with retrieval and citations: `python generate.py --workdir DIR
--prompt "To be, or not to be" [--max-tokens 128] [--temperature 0.8] [--top-k 40] [--top-p 0.95]`.

    from generate import generate, format_generation
    for g in generate("runs/retro_small", ["To be, or not to be"], max_tokens=128, seed=0):
      print(format_generation(g))       # the text, then the datastore chunks that shaped it

How each model retrieves while sampling (all decode with a KV cache, `models.init_cache`):
- RETRO: after every completed 64-token chunk (prompt or generated), its text is embedded
  with the BERT embedder and the datastore index returns K neighbours (chunk + continuation);
  they are encoded and condition the next 64 positions, as in the paper's sampling. A
  prompt shorter than 64 tokens starts with no neighbours. Same-document neighbours are not
  excluded (there is no "own document" at generation time).
- kNN-LM: at every step the LM's key queries the kNN datastore (one batched search for all
  prompts) and the next token is sampled from the interpolated full-vocabulary distribution
  log((1-λ) p_LM + λ p_kNN) (settings as `eval.evaluate(knn=...)`, defaults config.eval).
- REALM: the prompt's first chunk (its first 64 tokens) retrieves the top `realm_k` datastore
  chunks with the BERT index; the reader's retriever scores them plus the null document, and
  each token is sampled from the exact marginal over all of them,
  p(y_t | x, y_<t) = Σ_z p(z | x, y_<t) p(y_t | z, x, y_<t), whose posterior p(z | x, y_<t) ∝
  p(z | x) Π_s p(y_s | z, ...) is updated by every token after the query — the training
  objective's marginal, decoded token by token (not just the best candidate).
- transformer: no retrieval (the baseline); a transformer checkpoint can still sample as a
  kNN-LM with `knn=True`.

Citations: the generated tokens are grouped by the 64-token chunks of the whole sequence
(prompt included); each `ChunkCitation` lists the datastore text that conditioned those
tokens — RETRO: the neighbours of the previous chunk; REALM: the candidates with their
posterior weight at the chunk's end; kNN-LM: the datastore entries that gave the sampled
tokens the most probability. "The retrieved text can be used as attributions."

Sampling is deterministic for a fixed `seed`: prompt i draws from `fold_in(key(seed), i)`
folded with the position, so its random draws do not depend on the other prompts of the
batch. Prompts of different lengths advance in lockstep (a row copies its prompt until the
prompt ends), so all rows share RETRO's chunk boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import configs
import models
from common import cli
from common.errors import UserError, cli_main
from models import knnlm
from models.layers import Spec
from models.realm import RealmReader
from data import dataset
from retrieval import core, datastore
from retrieval import knn_datastore as knn_lib
from retrieval import index as index_lib
from training import checkpoint
from training.evaluation import check_data, knn_datastore, knn_settings, load_checkpoint

KNN_CITATIONS = 4  # kNN-LM: datastore entries cited per chunk
KNN_CONTEXT = 16  # kNN-LM: tokens of context shown before a cited entry's next token


@dataclasses.dataclass(frozen=True)
class Neighbour:
  """Datastore text that conditioned generated tokens.

  `chunk` is the datastore chunk id (tokens chunk*64 .. chunk*64+63 of the datastore
  stream, as in `python -m retrieval.search`); `position` is the token offset of the cited
  text in its document. `distance` is the retrieval score: the index's inner product
  (metric "ip", higher is nearer) or squared L2 for RETRO, the squared L2 distance of the
  keys for kNN-LM, the reader's retriever score s(x, z) for REALM. `weight`: REALM, the
  posterior p(z | x, text so far); kNN-LM, the probability the entry gave the sampled
  tokens of the chunk; RETRO, None. `text`: what the model saw (RETRO: chunk and
  continuation; REALM: the candidate chunk; kNN-LM: the context ending in the entry's
  next token).
  """

  chunk: int
  doc_id: str
  position: int
  distance: float
  text: str
  weight: float | None = None


@dataclasses.dataclass(frozen=True)
class ChunkCitation:
  """The generated tokens `token_ids[start:end]` (one 64-token chunk of the sequence, or
  the generated part of it) and the datastore text that conditioned them."""

  start: int
  end: int
  text: str
  neighbours: list[Neighbour]


@dataclasses.dataclass(frozen=True)
class Generation:
  """One prompt's continuation.

  `token_logprobs[i]` is log p(token_ids[i]) under the model's full distribution (RETRO
  with its neighbours, the kNN-LM interpolation, REALM's marginal) at temperature 1, before
  top-k/top-p. `finish_reason` is "length" (max_tokens) or "eos" (the model ended the
  document; the EOS token is not in `token_ids`).
  """

  prompt: str
  text: str
  prompt_ids: list[int]
  token_ids: list[int]
  token_logprobs: list[float]
  citations: list[ChunkCitation]
  finish_reason: str
  model: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Temperature (0 = greedy), top-k (0 = off) and nucleus top-p (1 = off) sampling."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self, vocab_size: int | None) -> None:
    """UserError for a bad setting (top_k against the vocabulary only if given)."""
    if not self.temperature >= 0:
      raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
      raise UserError(f"top_k={self.top_k} must be in 0..{vocab_size or 'vocab_size'} (0 = off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


@functools.partial(jax.jit, static_argnames=("sampler",))
def sample(logp_BxV: jax.Array, keys_B: jax.Array, pos: jax.Array, sampler: Sampler
           ) -> jax.Array:
  """Next tokens [B] from log-probabilities; row b draws with fold_in(keys_B[b], pos)."""
  if sampler.temperature == 0:
    return jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logp_BxV.astype(jnp.float32) / sampler.temperature
  if sampler.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampler.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if sampler.top_p < 1:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the better tokens
    kept_B = jnp.sum(before_BxV < sampler.top_p, axis=-1)  # at least the best token
    cut_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cut_Bx1, -jnp.inf, logits_BxV)
  keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, pos)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


# --- The datastore side ----------------------------------------------------------------------

class ChunkStore:
  """The datastore chunk table, its BERT embeddings and FAISS index (built and cached as
  for training), for retrieval by text while generating. Get one with `chunk_store`."""

  def __init__(self, config: ml_collections.ConfigDict, prepared: dataset.Prepared):
    self.tokenizer = prepared.tokenizer
    self.store = datastore.load_datastore(config, prepared)
    self.embedder = datastore.load_embedder(config)
    self.embeddings_NxE, emb_hash = datastore.chunk_embeddings(
        config, self.store.split, self.tokenizer, self.embedder)
    self.index, _ = datastore.datastore_index(config, self.embeddings_NxE, emb_hash)
    split = self.store.split
    self.m = split.chunk_size
    self.chunk_doc_N = np.asarray(split.chunk_doc())
    self.doc_start_D = np.searchsorted(np.asarray(split.token_doc), np.arange(len(split.doc_ids)))

  def search(self, chunks_Bxm: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, k] (-1 = none), distances [B, k]) of the chunks nearest to each row."""
    queries_BxE = self.embedder.embed_chunks(chunks_Bxm, self.tokenizer)
    dists_BxK, ids_BxK = index_lib.search(self.index, queries_BxE, k)
    return ids_BxK, dists_BxK

  def windows(self, ids_BxK: np.ndarray, length: int) -> np.ndarray:
    """int32 [B, K, length]: the tokens from each chunk's start (0 past its document)."""
    split = self.store.split
    return core.chunk_windows(split.tokens, split.token_doc, ids_BxK, self.m, length)

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


# --- Decoding loops ------------------------------------------------------------------------

class _Batch:
  """Prompts advancing in lockstep: tokens [B, T] (prompt, then samples) and log-probs."""

  def __init__(self, prompt_ids: list[list[int]], max_tokens: int, eos_id: int,
               stop_at_eos: bool):
    self.max_tokens, self.eos_id, self.stop_at_eos = max_tokens, eos_id, stop_at_eos
    self.len_B = np.array([len(p) for p in prompt_ids])
    self.tokens_BxT = np.zeros((len(prompt_ids), int(self.len_B.max()) + max_tokens), np.int32)
    for b, ids in enumerate(prompt_ids):
      self.tokens_BxT[b, :len(ids)] = ids
    self.logp_BxT = np.zeros(self.tokens_BxT.shape, np.float32)

  def advance(self, pos: int, sampled_B: np.ndarray, logp_BxV: np.ndarray) -> None:
    """Sets the tokens at pos+1: the prompt's where it continues, else the samples."""
    new_B = pos + 1 >= self.len_B
    self.tokens_BxT[new_B, pos + 1] = sampled_B[new_B]
    self.logp_BxT[:, pos + 1] = logp_BxV[np.arange(len(logp_BxV)), self.tokens_BxT[:, pos + 1]]

  def generated(self, b: int) -> tuple[list[int], list[float], str]:
    """Row b's generated tokens, their log-probs and the finish reason."""
    start = int(self.len_B[b])
    ids = self.tokens_BxT[b, start:start + self.max_tokens].tolist()
    logps = self.logp_BxT[b, start:start + self.max_tokens].tolist()
    if self.stop_at_eos and self.eos_id in ids:
      end = ids.index(self.eos_id)
      return ids[:end], logps[:end], "eos"
    return ids, logps, "length"


@functools.lru_cache(maxsize=None)
def _decode_fn(spec: Spec, **static: Any) -> Callable:
  """Jitted (params, cache, tokens, *args, **kwargs) -> (outputs, cache): one decoding call
  of the model's decoder (`static`: keyword arguments fixed at trace time: return_key)."""
  decoder = models.get_decoder(spec)

  def step(params, cache, tokens, *args, **kwargs):
    out, mutated = decoder.apply({"params": params, "cache": cache}, tokens, *args,
                                 decode=True, mutable=["cache"], **static, **kwargs)
    return out, mutated["cache"]

  return jax.jit(step, donate_argnums=1)


def _init_cache(model_config: Any, batch: int, length: int) -> Any:
  """A decoding cache for `length` tokens, rounded up to whole chunks (the unused tail is
  masked) so that other lengths reuse the compiled decoding step."""
  m = model_config.chunk_size
  return models.init_cache(model_config, batch, -(-length // m) * m)


def _keys(seed: int, batch: int) -> jax.Array:
  root = jax.random.key(seed)
  return jnp.stack([jax.random.fold_in(root, b) for b in range(batch)])


def _retro(config: ml_collections.ConfigDict, params: Any, batch: _Batch,
           store: ChunkStore | None, sampler: Sampler, keys_B: jax.Array
           ) -> dict[int, dict[int, list[Neighbour]]]:
  """RETRO sampling; returns row -> chunk c -> the neighbours retrieved for chunk c."""
  s = config.model
  m, K, R = s.chunk_size, s.num_neighbours, s.neighbour_len
  B, T = batch.tokens_BxT.shape
  step = _decode_fn(Spec.from_config(s))
  cache = _init_cache(s, B, T)
  retrieved: dict[int, dict[int, list[Neighbour]]] = {b: {} for b in range(B)}
  for pos in tqdm(range(T - 1), desc="generate (RETRO)", unit="tok", leave=False):
    nbr_Bx1xKxR = None
    if store is not None and pos % m == m - 1:  # chunk pos // m is complete: retrieve
      ids_BxK, dists_BxK = store.search(batch.tokens_BxT[:, pos + 1 - m:pos + 1], K)
      windows_BxKxR = store.windows(ids_BxK, R)
      nbr_Bx1xKxR = jnp.asarray(windows_BxKxR[:, None])
      for b in range(B):
        retrieved[b][pos // m] = [store.neighbour(i, d, w) for i, d, w in
                                  zip(ids_BxK[b], dists_BxK[b], windows_BxKxR[b]) if i >= 0]
    logits_Bx1xV, cache = step(params, cache, jnp.asarray(batch.tokens_BxT[:, pos:pos + 1]),
                               nbr_Bx1xKxR)
    logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0])
    batch.advance(pos, np.asarray(sample(logp_BxV, keys_B, pos, sampler)), np.asarray(logp_BxV))
  return retrieved


def _transformer(config: ml_collections.ConfigDict, params: Any, batch: _Batch,
                 sampler: Sampler, keys_B: jax.Array) -> None:
  B, T = batch.tokens_BxT.shape
  step = _decode_fn(Spec.from_config(config.model))
  cache = _init_cache(config.model, B, T)
  for pos in tqdm(range(T - 1), desc="generate", unit="tok", leave=False):
    logits_Bx1xV, cache = step(params, cache, jnp.asarray(batch.tokens_BxT[:, pos:pos + 1]))
    logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0])
    batch.advance(pos, np.asarray(sample(logp_BxV, keys_B, pos, sampler)), np.asarray(logp_BxV))


class _KnnEntries:
  """Where kNN-LM datastore entries come from: entry e is the e-th non-padding target of
  the split's sequences, in order (as `knn_datastore.build_knn_datastore` stores them)."""

  def __init__(self, store: knn_lib.KnnDatastore, split: dataset.TokenSplit,
               tokenizer: Any):
    self.split, self.tokenizer = split, tokenizer
    targets = np.asarray(split.tokens[1:split.num_sequences * split.seq_len + 1])
    self.position_E = np.flatnonzero(targets) + 1  # stream position of each entry's token
    if len(self.position_E) != store.keys.shape[0]:
      raise UserError(f"the kNN-LM datastore {store.directory} has {store.keys.shape[0]} "
                      f"entries but the {split.name} split has {len(self.position_E)} targets; "
                      f"delete {store.directory} to rebuild it")
    self.doc_start_D = np.searchsorted(np.asarray(split.token_doc), np.arange(len(split.doc_ids)))

  def neighbour(self, entry: int, distance: float, weight: float) -> Neighbour:
    q = int(self.position_E[entry])
    doc = int(self.split.token_doc[q])
    start = int(self.doc_start_D[doc])
    context = np.asarray(self.split.tokens[max(start, q - KNN_CONTEXT):q + 1])
    return Neighbour(chunk=q // self.split.chunk_size, doc_id=self.split.doc_ids[doc],
                     position=q - start, distance=float(distance),
                     text=self.tokenizer.decode(context.tolist()), weight=weight)


def _knn_search(store: knn_lib.KnnDatastore, q_BxD: np.ndarray, k: int, exact: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`KnnDatastore.search` plus the entry ids: (dists [B, k], tokens [B, k], ids [B, k])."""
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


@functools.partial(jax.jit, static_argnames=("vocab_size", "temperature", "lam"))
def _knn_mix(logits_BxV: jax.Array, dists_BxK: jax.Array, tokens_BxK: jax.Array,
             vocab_size: int, temperature: float, lam: float
             ) -> tuple[jax.Array, jax.Array]:
  """(interpolated log p [B, V], each neighbour's weight in the kNN distribution [B, K])."""
  knn_BxV = knnlm.knn_log_probs(dists_BxK[:, None], tokens_BxK[:, None], vocab_size,
                                temperature)[:, 0]
  mixed_BxV = knnlm.interpolate(jax.nn.log_softmax(logits_BxV), knn_BxV, lam)
  return mixed_BxV, jax.nn.softmax(-dists_BxK / temperature, axis=-1)


def _knnlm(config: ml_collections.ConfigDict, params: Any, batch: _Batch, sampler: Sampler,
           keys_B: jax.Array, settings: Mapping[str, Any], store: knn_lib.KnnDatastore,
           entries: _KnnEntries) -> dict[int, dict[int, list[Neighbour]]]:
  """kNN-LM sampling; returns row -> position of a generated token -> supporting entries."""
  B, T = batch.tokens_BxT.shape
  k, lam, temp = int(settings["k"]), float(settings["lam"]), float(settings["temperature"])
  step = _decode_fn(Spec.from_config(config.model), return_key=True)
  cache = _init_cache(config.model, B, T)
  support: dict[int, dict[int, list[Neighbour]]] = {b: {} for b in range(B)}
  for pos in tqdm(range(T - 1), desc="generate (kNN-LM)", unit="tok", leave=False):
    (logits_Bx1xV, key_Bx1xD), cache = step(params, cache,
                                            jnp.asarray(batch.tokens_BxT[:, pos:pos + 1]))
    dists_BxK, tokens_BxK, ids_BxK = _knn_search(store, np.asarray(key_Bx1xD[:, 0]), k,
                                                 bool(settings["exact"]))
    logp_BxV, w_BxK = _knn_mix(logits_Bx1xV[:, 0], dists_BxK, tokens_BxK,
                               config.model.vocab_size, temp, lam)
    batch.advance(pos, np.asarray(sample(logp_BxV, keys_B, pos, sampler)), np.asarray(logp_BxV))
    chosen_B = batch.tokens_BxT[:, pos + 1]
    w_BxK = np.asarray(w_BxK)
    for b in range(B):
      if pos + 1 >= batch.len_B[b]:
        support[b][pos + 1] = [entries.neighbour(int(i), float(d), lam * float(w))
                               for i, d, t, w in zip(ids_BxK[b], dists_BxK[b], tokens_BxK[b],
                                                     w_BxK[b]) if i >= 0 and t == chosen_B[b]]
  return support


def _realm(config: ml_collections.ConfigDict, params: Any, batch: _Batch, store: ChunkStore,
           sampler: Sampler, keys_B: jax.Array, k: int
           ) -> dict[int, list[tuple[int, list[Neighbour]]]]:
  """REALM sampling from the marginal over the top-k candidates and the null document.

  Returns row -> [(position, candidates with their posterior weight after that position)]
  for every position from the first generated token on.
  """
  s = config.model
  m, M = s.chunk_size, s.realm.doc_len
  B, T = batch.tokens_BxT.shape
  query_len_B = np.minimum(batch.len_B, m)
  query_Bxm = np.where(np.arange(m) < query_len_B[:, None], batch.tokens_BxT[:, :m], 0)
  ids_BxK, _ = store.search(query_Bxm, k)
  cand_BxKxM = store.windows(ids_BxK, M)
  live_BxK = ids_BxK >= 0
  cand_emb_BxKxE = np.where(live_BxK[..., None],
                            np.asarray(store.embeddings_NxE[np.where(live_BxK, ids_BxK, 0)]), 0)
  model = models.get_model(s)
  scores_BxZ = jax.jit(functools.partial(model.apply, method=RealmReader.retrieval_logits))(
      {"params": params}, jnp.asarray(query_Bxm), jnp.asarray(cand_BxKxM),
      jnp.asarray(cand_emb_BxKxE, jnp.float32))
  log_w_BxZ = np.asarray(jax.nn.log_softmax(scores_BxZ), np.float64)  # p(z | x), z=0 null
  Z = k + 1
  docs_NxM = np.concatenate([np.zeros((B, 1, M), np.int32), cand_BxKxM], axis=1).reshape(B * Z, M)
  step = _decode_fn(Spec.from_config(s))
  cache = _init_cache(s, B * Z, M + T)
  reader = params["reader"]
  _, cache = step(reader, cache, jnp.asarray(docs_NxM), valid_BxL=jnp.asarray(docs_NxM != 0))
  ones_Nx1 = jnp.ones((B * Z, 1), bool)
  trace: dict[int, list[tuple[int, list[Neighbour]]]] = {b: [] for b in range(B)}
  for pos in tqdm(range(T - 1), desc="generate (REALM)", unit="tok", leave=False):
    tokens_Nx1 = np.repeat(batch.tokens_BxT[:, pos:pos + 1], Z, axis=0)
    logits_Nx1xV, cache = step(reader, cache, jnp.asarray(tokens_Nx1), valid_BxL=ones_Nx1)
    logp_BxZxV = np.asarray(jax.nn.log_softmax(logits_Nx1xV[:, 0]), np.float64).reshape(B, Z, -1)
    post_BxZ = log_w_BxZ - np.logaddexp.reduce(log_w_BxZ, axis=1, keepdims=True)
    logp_BxV = np.logaddexp.reduce(post_BxZ[..., None] + logp_BxZxV, axis=1).astype(np.float32)
    batch.advance(pos, np.asarray(sample(jnp.asarray(logp_BxV), keys_B, pos, sampler)), logp_BxV)
    chosen_B = batch.tokens_BxT[:, pos + 1]
    after_query_B = pos + 1 >= query_len_B
    log_w_BxZ = log_w_BxZ + np.where(after_query_B[:, None],
                                     logp_BxZxV[np.arange(B), :, chosen_B], 0.0)
    post_BxZ = np.exp(log_w_BxZ - np.logaddexp.reduce(log_w_BxZ, axis=1, keepdims=True))
    for b in range(B):
      if pos + 1 >= batch.len_B[b]:
        trace[b].append((pos + 1, [
            store.neighbour(i, score, cand_BxKxM[b, j], float(post_BxZ[b, j + 1]))
            for j, (i, score) in enumerate(zip(ids_BxK[b], np.asarray(scores_BxZ)[b, 1:]))
            if i >= 0]))
  return trace


# --- Public API --------------------------------------------------------------------------------

def _load(source: str | os.PathLike | tuple[ml_collections.ConfigDict, Any], step: int | None
          ) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any] | None]:
  """(config, params, checkpoint metadata or None) of a workdir or a (config, params) pair."""
  if isinstance(source, tuple):
    if len(source) != 2 or not isinstance(source[0], ml_collections.ConfigDict):
      raise UserError("pass a workdir or a (config, params) pair such as "
                      "train.load_checkpoint(workdir) returns")
    return source[0], source[1], None
  workdir = Path(source)
  if not (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first: python train.py --config NAME "
                    f"--workdir {workdir}")
  config, params = load_checkpoint(workdir, step)
  return config, params, checkpoint.restore_meta(workdir, step)


def _chunk_citations(start: int, token_ids: list[int], m: int, tokenizer: Any,
                     cited: Callable[[int, int], list[Neighbour]]) -> list[ChunkCitation]:
  """Generated tokens (from sequence position `start`) grouped by the sequence's m-token
  chunks, each with `cited(first, last)`: the neighbours for positions first..last."""
  out = []
  pos, stop = start, start + len(token_ids)
  while pos < stop:
    end = min((pos // m + 1) * m, stop)
    out.append(ChunkCitation(start=pos - start, end=end - start,
                             text=tokenizer.decode(token_ids[pos - start:end - start]),
                             neighbours=cited(pos, end - 1)))
    pos = end
  return out


def generate(source: str | os.PathLike | tuple[ml_collections.ConfigDict, Any],
             prompts: Sequence[str], max_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, *, step: int | None = None,
             retrieval: bool = True, knn: Mapping[str, Any] | bool | None = None,
             realm_k: int | None = None, stop_at_eos: bool = True) -> list[Generation]:
  """Samples a continuation of every prompt (batched), with retrieval and citations.

  Args:
    source: a workdir written by train.py (its checkpoint at `step`, default the latest),
      or `(config, params)` as `train.load_checkpoint` returns.
    prompts: the texts to continue; an empty prompt starts a new document.
    max_tokens: tokens to generate per prompt.
    temperature, top_k, top_p: sampling (temperature 0 = greedy; top_k 0 and top_p 1 = off).
    seed: generation is a pure function of the seed and the prompt (and its index).
    retrieval: RETRO only: False samples without neighbours (the same decoder).
    knn: kNN-LM settings as for `eval.evaluate`: True or {"lam", "k", "temperature",
      "exact"} (defaults config.eval.knn_*); None = on for knnlm checkpoints, off otherwise.
    realm_k: REALM: candidates to marginalise over (default config.eval.realm_k).
    stop_at_eos: end a continuation at the first EOS (the end of a document).
  Returns:
    One `Generation` per prompt, in order: text, token ids and log-probs, citations.
  """
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise UserError("prompts must be a non-empty list of strings")
  if max_tokens < 1:
    raise UserError(f"max_tokens={max_tokens} must be >= 1")
  sampler = Sampler(float(temperature), int(top_k), float(top_p))
  sampler.check(vocab_size=None)
  config, params, meta = _load(source, step)
  name = config.model.name
  sampler.check(config.model.vocab_size)
  if knn is None:
    knn = name == "knnlm"
  if knn and name not in ("transformer", "knnlm"):
    raise UserError(f"kNN-LM sampling needs a decoder LM checkpoint (transformer/knnlm), "
                    f"not {name!r}")
  settings = knn_settings(config, knn)
  realm_k = config.eval.realm_k if realm_k is None else realm_k
  if name == "realm" and realm_k < 1:
    raise UserError(f"realm_k={realm_k} must be >= 1")
  prepared = dataset.prepare(config)
  if meta is not None:
    check_data(meta, prepared.hashes, Path(source))
  tok = prepared.tokenizer
  prompt_ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
  batch = _Batch(prompt_ids, int(max_tokens), tok.eos_id, stop_at_eos)
  keys_B = _keys(seed, len(prompts))
  m = config.model.chunk_size

  def none(first: int, last: int) -> list[Neighbour]:
    return []

  cited: list[Callable[[int, int], list[Neighbour]]] = [none] * len(prompts)
  if name == "retro":
    store = chunk_store(config) if retrieval else None
    retrieved = _retro(config, params, batch, store, sampler, keys_B)
    # Tokens of sequence chunk j were predicted from positions jm-1 .. (j+1)m-2: chunk j-1's.
    cited = [lambda first, last, r=retrieved[b]: r.get(first // m - 1, [])
             for b in range(len(prompts))]
  elif name == "realm":
    trace = _realm(config, params, batch, chunk_store(config), sampler, keys_B,
                   realm_k)
    cited = [lambda first, last, t=dict(trace[b]): t[last] for b in range(len(prompts))]
  elif settings is not None:
    store, _ = knn_datastore(config, params, prepared, meta["step"] if meta else None)
    support = _knnlm(config, params, batch, sampler, keys_B, settings, store,
                     _KnnEntries(store, prepared.train, tok))
    cited = [functools.partial(_top_support, support[b]) for b in range(len(prompts))]
  else:
    _transformer(config, params, batch, sampler, keys_B)

  out = []
  for b, prompt in enumerate(prompts):
    ids, logps, reason = batch.generated(b)
    out.append(Generation(prompt=prompt, text=tok.decode(ids), prompt_ids=prompt_ids[b],
                          token_ids=ids, token_logprobs=logps,
                          citations=_chunk_citations(int(batch.len_B[b]), ids, m, tok, cited[b]),
                          finish_reason=reason, model=name))
  return out


def _top_support(support: Mapping[int, list[Neighbour]], first: int, last: int
                 ) -> list[Neighbour]:
  """kNN-LM: the entries that gave positions first..last the most probability, summed."""
  total: dict[int, tuple[float, Neighbour]] = {}
  for pos in range(first, last + 1):
    for n in support.get(pos, []):
      key = (n.chunk, n.position, n.doc_id)
      weight = total.get(key, (0.0, n))[0] + (n.weight or 0.0)
      total[key] = (weight, n)
  best = sorted(total.values(), key=lambda x: -x[0])[:KNN_CITATIONS]
  return [dataclasses.replace(n, weight=w) for w, n in best]


def format_generation(g: Generation, snippet: int = 100) -> str:
  """The prompt and continuation, then per chunk the cited datastore text."""
  lines = [f"{g.prompt}{g.text}", "", f"[{g.model}: {len(g.token_ids)} tokens, "
           f"finished by {g.finish_reason}]"]
  for c in g.citations:
    text = " ".join(c.text.split())
    lines.append(f"tokens {c.start}-{c.end - 1}: \"{text[:snippet]}\"")
    if not c.neighbours:
      lines.append("  (no retrieved text conditioned these tokens)")
    for rank, n in enumerate(c.neighbours, 1):
      weight = "" if n.weight is None else f", weight {n.weight:.3f}"
      cited = " ".join(n.text.split())
      lines.append(f"  {rank}. {n.doc_id} @ token {n.position} (chunk {n.chunk}, "
                   f"distance {n.distance:.4f}{weight}): \"{cited[:snippet]}\"")
  return "\n".join(lines)


@cli_main
def main(argv: Sequence[str] | None = None) -> list[Generation]:
  p = cli.parser("Sample text from a checkpoint, with retrieval and citations.",
                 config_required=False)
  p.add_argument("--workdir", required=True, help="run directory written by train.py")
  p.add_argument("--prompt", action="append", required=True,
                 help="text to continue (repeat for a batch)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k best tokens (0 = all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--no-retrieval", action="store_true", help="RETRO: sample without neighbours")
  p.add_argument("--knn", action="store_true", help="sample a transformer as a kNN-LM")
  p.add_argument("--lam", type=float, default=None, help="kNN-LM interpolation weight")
  p.add_argument("--k", type=int, default=None, help="kNN-LM neighbours per step")
  p.add_argument("--knn-temperature", type=float, default=None,
                 help="kNN-LM softmax temperature over distances")
  p.add_argument("--realm-k", type=int, default=None, help="REALM candidates to marginalise")
  p.add_argument("--keep-eos", action="store_true", help="continue past the end of a document")
  p.add_argument("--json", default=None, help="also write the generations to this JSON file")
  args, _ = cli.parse(p, argv)
  knn = None
  if args.knn or any(v is not None for v in (args.lam, args.k, args.knn_temperature)):
    knn = {"lam": args.lam, "k": args.k, "temperature": args.knn_temperature}
  generations = generate(args.workdir, args.prompt, args.max_tokens, args.temperature,
                         args.top_k, args.top_p, args.seed, step=args.step,
                         retrieval=not args.no_retrieval, knn=knn, realm_k=args.realm_k,
                         stop_at_eos=not args.keep_eos)
  for g in generations:
    print(format_generation(g), end="\n\n")
  if args.json:
    Path(args.json).write_text(json.dumps([g.to_json() for g in generations], indent=2))
    print(f"wrote {args.json}")
  return generations


if __name__ == "__main__":
  main(sys.argv[1:])
