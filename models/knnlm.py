"""kNN-LM (Khandelwal et al. 2020): a neighbour distribution over the vocabulary, interpolated.

The model trained for kNN-LM is the plain `Transformer`; its key is the normalised input
to the last feed-forward layer (`Transformer.apply(..., return_key=True)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.errors import UserError


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
