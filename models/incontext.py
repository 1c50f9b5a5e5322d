"""In-Context RALM (Ram et al. 2023): a decoder LM whose context is prefixed with retrieved text.

Every `stride` tokens (config.model.incontext.stride) the last `query_len` tokens query the
datastore; the next block of `stride` tokens is predicted by the unchanged decoder reading
[retrieved document ; all tokens so far]. The first block has no query and reads no
document. A document is a datastore chunk plus its continuation (model.neighbour_len
tokens, padding masked). With K = model.num_neighbours > 1 the block's next-token
distributions under each document are averaged (REPLUG, Shi et al. 2023, with uniform
weights over the retrieved documents): p(y | x) = 1/K sum_d p(y | d ; x).

The parameters are exactly a `Transformer`'s, so any baseline checkpoint evaluates as
In-Context RALM without training (`python eval.py --workdir runs/baseline_small --model
incontext`), and `python train.py --config incontext_small` trains with retrieval in the
context (retrieval-aware training). Without neighbours the model is the plain decoder.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import models
from common.errors import UserError
from models.family import EvalVariant, Family, RetrievalSpec, token_batch
from models.layers import Spec
from models.transformer import Transformer


class InContext(Transformer):
  """`apply(vars, inputs_BxL, neighbours_BxCxKxR=None, deterministic=True)` -> log-probs.

  `neighbours` [B, C, K, R] hold, for query window i (ending at token (i+1)*stride), K
  documents of R tokens; block j = tokens [j*stride, (j+1)*stride) reads window j-1's.
  The output is normalised log-probabilities [B, L, V] (the REPLUG mixture for K > 1),
  which `models.token_log_probs` treats as logits.
  """

  def __call__(self, inputs_BxL: jax.Array, neighbours_BxCxKxR: jax.Array | None = None,
               deterministic: bool = True, decode: bool = False,
               valid_BxL: jax.Array | None = None) -> jax.Array:
    if neighbours_BxCxKxR is None or decode:
      return super().__call__(inputs_BxL, deterministic, valid_BxL=valid_BxL, decode=decode)
    stride = self.spec.option("stride")
    B, L = inputs_BxL.shape
    _, C, K, R = neighbours_BxCxKxR.shape
    if L % stride or C != L // stride:
      raise UserError(f"In-Context RALM neighbours have shape {tuple(neighbours_BxCxKxR.shape)}"
                      f"; expected [B={B}, C={L // stride}, K, R] for inputs of length {L} and "
                      f"model.incontext.stride={stride} (a multiple of it)")
    blocks = [jax.nn.log_softmax(super().__call__(inputs_BxL[:, :stride], deterministic), -1)]
    for j in range(1, L // stride):
      docs_NxR = neighbours_BxCxKxR[:, j - 1].reshape(B * K, R)
      prefix_NxP = jnp.repeat(inputs_BxL[:, :(j + 1) * stride], K, axis=0)
      seq_NxT = jnp.concatenate([docs_NxR, prefix_NxP.astype(docs_NxR.dtype)], axis=1)
      valid_NxT = jnp.concatenate([docs_NxR != 0, jnp.ones(prefix_NxP.shape, bool)], axis=1)
      logits_NxSxV = super().__call__(seq_NxT, deterministic, valid_BxL=valid_NxT)[:, -stride:]
      logp_BxKxSxV = jax.nn.log_softmax(logits_NxSxV, -1).reshape(B, K, stride, -1)
      blocks.append(_mixture(logp_BxKxSxV, (docs_NxR != 0).any(-1).reshape(B, K)))
    return jnp.concatenate(blocks, axis=1)


def _mixture(logp_BxKxSxV: jax.Array, has_doc_BxK: jax.Array) -> jax.Array:
  """log of the uniform mixture over the retrieved documents (rows with none: over all K,
  which then all read nothing)."""
  use_BxK = has_doc_BxK | ~has_doc_BxK.any(-1, keepdims=True)
  log_w_BxK = jnp.where(use_BxK, 0.0, -jnp.inf) - jnp.log(use_BxK.sum(-1, keepdims=True))
  return jax.nn.logsumexp(logp_BxKxSxV + log_w_BxK[..., None, None], axis=1)


def retrieval(spec: Spec) -> RetrievalSpec:
  """K documents of R tokens for the query window ending at every stride boundary."""
  return RetrievalSpec(kind="neighbours", k=spec.num_neighbours, length=spec.neighbour_len,
                       batch_keys=("neighbours",), stride=spec.option("stride"),
                       query_len=spec.option("query_len"))


def example_batch(spec: Spec, batch_size: int, seq_len: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  batch = token_batch(spec, batch_size, seq_len, rng)
  shape = (batch_size, seq_len // spec.option("stride"), spec.num_neighbours,
           spec.neighbour_len)
  batch["neighbours"] = rng.integers(1, spec.vocab_size, size=shape, dtype=np.int32)
  return batch


def validate(config: Any) -> None:
  s = config.model.incontext
  if s.stride <= 0 or config.data.seq_len % s.stride:
    raise UserError(f"model.incontext.stride={s.stride} must be a positive divisor of "
                    f"data.seq_len={config.data.seq_len}")
  if s.query_len <= 0:
    raise UserError(f"model.incontext.query_len={s.query_len} must be positive")
  if config.model.loss_chunk:
    raise UserError(f"model.loss_chunk={config.model.loss_chunk}: In-Context RALM's outputs "
                    "are mixtures of log-probabilities, not logits; set "
                    "--config.model.loss_chunk=0")


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """In-Context RALM decoding: at every stride boundary the last query_len tokens retrieve
  K documents; the next block is decoded from [document ; text so far] (one cache per
  document, rebuilt at each boundary) and the K next-token distributions are averaged.
  A block's citations are the documents it read."""
  s, store = ctx.spec, ctx.store
  stride, q, R, K = s.option("stride"), s.option("query_len"), s.neighbour_len, ctx.k
  tokens_BxT = ctx.tokens_BxT
  B, T = tokens_BxT.shape
  step = ctx.decoder()
  read: dict[int, dict[int, list]] = {b: {} for b in range(B)}
  docs_NxR = np.zeros((B * K, R), np.int32)
  cache = None
  for pos in ctx.positions("generate (In-Context RALM)"):
    if pos % stride == 0:  # a block starts: retrieve with the last q tokens, re-read all
      if store is not None and pos > 0:
        query_BxQ = tokens_BxT[:, max(0, pos - q):pos]
        ids_BxK, dists_BxK = store.search(query_BxQ, K)
        windows_BxKxR = store.windows(ids_BxK, R, query_BxQ)
        docs_NxR = windows_BxKxR.reshape(B * K, R)
        for b in range(B):
          read[b][pos // stride] = [store.neighbour(i, d, w) for i, d, w in
                                    zip(ids_BxK[b], dists_BxK[b], windows_BxKxR[b]) if i >= 0]
      cache = ctx.cache(B * K, R + T)
      _, cache = step(ctx.params, cache, jnp.asarray(docs_NxR), valid_BxL=jnp.asarray(docs_NxR != 0))
      if pos > 0:
        prefix_NxP = np.repeat(tokens_BxT[:, :pos], K, axis=0)
        _, cache = step(ctx.params, cache, jnp.asarray(prefix_NxP))
    tokens_Nx1 = np.repeat(tokens_BxT[:, pos:pos + 1], K, axis=0)
    logits_Nx1xV, cache = step(ctx.params, cache, jnp.asarray(tokens_Nx1))
    logp_BxKxV = jax.nn.log_softmax(logits_Nx1xV[:, 0], -1).reshape(B, K, -1)
    has_doc_BxK = jnp.asarray((docs_NxR != 0).any(-1).reshape(B, K))
    ctx.draw(pos, _mixture(logp_BxKxV[:, :, None], has_doc_BxK)[:, 0])
  return lambda b, first, last: read[b].get(first // stride, [])


FAMILY = Family(
    name="incontext", model=InContext, loss=models.lm_loss, sample=sample,
    inputs=lambda spec, batch: (batch["inputs"], batch.get("neighbours")),
    retrieval=retrieval, example_batch=example_batch, decoder=Transformer, validate=validate,
    eval_variants=(EvalVariant("retrieval on"), EvalVariant("retrieval off", ("neighbours",), "no_retrieval")))
