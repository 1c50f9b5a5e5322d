"""kNN-LM (Khandelwal et al. 2020): a neighbour distribution over the vocabulary, interpolated.

The model trained for kNN-LM is the plain `Transformer`; its key is the normalised input
to the last feed-forward layer (`Transformer.apply(..., return_key=True)`). The family is
the transformer's, evaluated and sampled with the datastore by default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError
from models import transformer

CITATIONS = 4  # datastore entries cited per chunk of generated text


def knn_log_probs(dists_BxLxK: jax.Array, tokens_BxLxK: jax.Array, vocab_size: int,
                  temperature: float) -> jax.Array:
  """log p_kNN(v) [B, L, V] from K neighbours: softmax(-dist/T) summed per next token.

  `dists` are distances (smaller = closer: squared L2, or the negated inner product);
  tokens never retrieved get log 0 = -inf. The full vocabulary is returned, so the
  result also serves sampling.
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise UserError(f"kNN temperature {temperature} must be positive (eval.knn_temperature)")
  B, L, K = dists_BxLxK.shape
  w_NxK = jax.nn.softmax(-dists_BxLxK.astype(jnp.float32).reshape(B * L, K) / temperature,
                         axis=-1)
  rows_Nx1 = jnp.arange(B * L)[:, None]
  p_NxV = jnp.zeros((B * L, vocab_size), jnp.float32).at[
      rows_Nx1, tokens_BxLxK.reshape(B * L, K)].add(w_NxK)
  return jnp.log(p_NxV).reshape(B, L, vocab_size)


def knn_target_log_probs(dists_BxLxK: jax.Array, tokens_BxLxK: jax.Array,
                         targets_BxL: jax.Array, temperature: float) -> jax.Array:
  """log p_kNN(y) [B, L] of the targets only: `knn_log_probs` gathered at `targets`.

  Sums the softmax weights of the neighbours whose token is the target, O(K) per
  position instead of a [B, L, V] scatter: what evaluation needs.
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise UserError(f"kNN temperature {temperature} must be positive (eval.knn_temperature)")
  w_BxLxK = jax.nn.softmax(-dists_BxLxK.astype(jnp.float32) / temperature, axis=-1)
  hit_BxLxK = tokens_BxLxK == targets_BxL[..., None]
  return jnp.log(jnp.sum(jnp.where(hit_BxLxK, w_BxLxK, 0.0), axis=-1))


def interpolate(lm_logp: jax.Array, knn_logp: jax.Array, lam: float) -> jax.Array:
  """log((1-lam) p_LM + lam p_kNN), exact at lam=0 (the LM) and lam=1 (the kNN)."""
  if isinstance(lam, (int, float)) and not 0.0 <= lam <= 1.0:
    raise UserError(f"kNN interpolation weight {lam} must be in [0, 1] (eval.knn_lam)")
  lam = jnp.asarray(lam, jnp.float32)
  return jnp.logaddexp(jnp.log1p(-lam) + lm_logp, jnp.log(lam) + knn_logp)


@functools.partial(jax.jit, static_argnames=("vocab_size", "temperature", "lam"))
def mix(logits_BxV: jax.Array, dists_BxK: jax.Array, tokens_BxK: jax.Array, vocab_size: int,
        temperature: float, lam: float) -> tuple[jax.Array, jax.Array]:
  """(interpolated log p [B, V], each neighbour's weight in the kNN distribution [B, K])."""
  knn_BxV = knn_log_probs(dists_BxK[:, None], tokens_BxK[:, None], vocab_size, temperature)[:, 0]
  mixed_BxV = interpolate(jax.nn.log_softmax(logits_BxV), knn_BxV, lam)
  return mixed_BxV, jax.nn.softmax(-dists_BxK / temperature, axis=-1)


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """kNN-LM decoding: at every step the LM's key queries the datastore (one batched search
  for all rows) and the next token is drawn from log((1-λ) p_LM + λ p_kNN). A generated
  token's citations are the entries that gave it probability."""
  settings = ctx.knn
  k, lam, temp = int(settings["k"]), float(settings["lam"]), float(settings["temperature"])
  store = ctx.knn_store
  tokens_BxT = ctx.tokens_BxT
  B, T = tokens_BxT.shape
  step = ctx.decoder(return_key=True)
  cache = ctx.cache(B, T)
  support: dict[int, dict[int, list]] = {b: {} for b in range(B)}
  for pos in ctx.positions("generate (kNN-LM)"):
    (logits_Bx1xV, key_Bx1xD), cache = step(ctx.params, cache,
                                            jnp.asarray(tokens_BxT[:, pos:pos + 1]))
    dists_BxK, next_BxK, ids_BxK = store.search(np.asarray(key_Bx1xD[:, 0]), k,
                                                bool(settings["exact"]))
    logp_BxV, w_BxK = mix(logits_Bx1xV[:, 0], dists_BxK, next_BxK, ctx.spec.vocab_size, temp,
                          lam)
    ctx.draw(pos, logp_BxV)
    chosen_B = tokens_BxT[:, pos + 1]
    w_BxK = np.asarray(w_BxK)
    for b in range(B):
      if pos + 1 >= ctx.len_B[b]:
        support[b][pos + 1] = [store.neighbour(int(i), float(d), lam * float(w))
                               for i, d, t, w in zip(ids_BxK[b], dists_BxK[b], next_BxK[b],
                                                     w_BxK[b]) if i >= 0 and t == chosen_B[b]]
  return lambda b, first, last: top_support(support[b], first, last)


def top_support(support: dict[int, list], first: int, last: int, top: int = CITATIONS
                ) -> list:
  """The `top` entries that gave positions first..last the most probability, summed."""
  total: dict[tuple, tuple[float, Any]] = {}
  for pos in range(first, last + 1):
    for n in support.get(pos, []):
      key = (n.chunk, n.position, n.doc_id)
      total[key] = (total.get(key, (0.0, n))[0] + (n.weight or 0.0), n)
  best = sorted(total.values(), key=lambda x: -x[0])[:top]
  return [dataclasses.replace(n, weight=w) for w, n in best]


FAMILY = dataclasses.replace(transformer.FAMILY, name="knnlm", knn_default=True)
