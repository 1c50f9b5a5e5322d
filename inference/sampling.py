"""Sampling machinery shared by every family's decoding loop (`Family.sample`).

What a generation returns (`Generation`, with `ChunkCitation`s of `Neighbour`s), the
next-token sampler (temperature, top-k, top-p; deterministic per seed and row), the
`Lockstep` batch of prompts advancing together, and the cached jitted decoding step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import models
from common.errors import UserError
from models.layers import Spec


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


# --- Decoding ---------------------------------------------------------------------------

class Lockstep:
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
def decode_fn(spec: Spec, **static: Any) -> Callable:
  """Jitted (params, cache, tokens, *args, **kwargs) -> (outputs, cache): one decoding call
  of the model's decoder (`static`: keyword arguments fixed at trace time: return_key)."""
  decoder = models.get_decoder(spec)

  def step(params, cache, tokens, *args, **kwargs):
    out, mutated = decoder.apply({"params": params, "cache": cache}, tokens, *args,
                                 decode=True, mutable=["cache"], **static, **kwargs)
    return out, mutated["cache"]

  return jax.jit(step, donate_argnums=1)


def init_cache(model_config: Any, batch: int, length: int) -> Any:
  """A decoding cache for `length` tokens, rounded up to whole chunks (the unused tail is
  masked) so that other lengths reuse the compiled decoding step."""
  m = model_config.chunk_size
  return models.init_cache(model_config, batch, -(-length // m) * m)


def row_keys(seed: int, batch: int) -> jax.Array:
  root = jax.random.key(seed)
  return jnp.stack([jax.random.fold_in(root, b) for b in range(batch)])
