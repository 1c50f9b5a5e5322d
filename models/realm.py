"""REALM (Guu et al. 2020) adapted to a causal LM: a retriever and a reader marginalised over z.

The query is the first chunk of the input, x_q = inputs[:, :m]. The retriever scores a
candidate chunk z as s(x, z) = q(x_q) . (W e_z) / sqrt(R), with q a trainable query encoder
(width `model.realm.retriever_dim`), W a trainable linear map from the index space
(`model.realm.embedding_dim`) and e_z the candidate's embedding in the index space:
- doc_encoder="stale": e_z = batch["candidate_embeddings"] (from the index, no gradient);
- doc_encoder="trainable": e_z = the stale embedding plus a trainable document encoder
  over batch["candidates"] tokens, recomputed in the step (gradients reach it). Its output
  layer starts at zero, so the first index refresh reproduces the stale index, and training
  moves the documents from there (REALM starts its encoders from a pre-trained retriever).
`embed_query` returns W^T q(x_q) / sqrt(R), the query in the index space, so a MIPS search of an
index of `embed_documents` (or of the original stale) vectors ranks by exactly s(x, z).
A null document (empty chunk, all padding) is always candidate 0; it scores as the mean of
the K candidates plus a learned scalar offset (see `retrieval_logits`). The reader is a
`Transformer` over [document ; input] with padded document tokens masked; it predicts every
input position given z.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError
from models import apply_fn, token_log_probs
from models.family import Family, RetrievalSpec, token_batch
from models.layers import Encoder, Spec, dense_init, embed_init
from models.transformer import Transformer


def marginal_log_likelihood(retrieval_logits_BxK: jax.Array, token_logp_BxKxL: jax.Array,
                            weights_BxL: jax.Array) -> jax.Array:
  """Per-example log p(y|x) = logsumexp_z(log_softmax(retrieval)_z + sum_t w_t log p(y_t|x,z))."""
  log_pz_BxK = jax.nn.log_softmax(retrieval_logits_BxK.astype(jnp.float32), axis=-1)
  ll_BxK = jnp.sum(token_logp_BxKxL.astype(jnp.float32) * weights_BxL[:, None, :], axis=-1)
  return jax.nn.logsumexp(log_pz_BxK + ll_BxK, axis=-1)


class PooledEncoder(nn.Module):
  """Bidirectional encoder (model.encoder.* sizes) -> masked mean pool -> linear to out_dim
  (zero-initialised with `zero_out`: a residual that starts as a no-op)."""
  spec: Spec
  out_dim: int
  zero_out: bool = False

  @nn.compact
  def __call__(self, tokens_NxM: jax.Array, deterministic: bool) -> jax.Array:
    s, e = self.spec, self.spec.encoder
    valid_NxM = tokens_NxM != 0
    x_NxMxE = nn.Embed(s.vocab_size, e.width, dtype=s.dtype, embedding_init=embed_init(),
                       name="embed")(tokens_NxM)
    x_NxMxE = Encoder(e, s.rope_base, s.dropout, s.dtype, s.remat, name="encoder")(
        x_NxMxE[:, None], valid_NxM[:, None], None, deterministic)[:, 0]
    w_NxMx1 = valid_NxM[..., None].astype(jnp.float32)
    pooled_NxE = jnp.sum(x_NxMxE.astype(jnp.float32) * w_NxMx1, axis=1) / jnp.maximum(
        jnp.sum(w_NxMx1, axis=1), 1.0)
    init = (nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None))
            if self.zero_out else dense_init(("embed", None)))
    return nn.Dense(self.out_dim, use_bias=False, kernel_init=init, name="out")(pooled_NxE)


class RealmReader(nn.Module):
  """Retriever + reader. `apply(vars, inputs_BxL, candidates_BxKxM, candidate_embeddings_BxKxE)`.

  Returns (retrieval_logits [B, K+1], reader logits [B, K+1, L, V]); index 0 is the null
  document. Separately callable: `apply(vars, tokens, method=RealmReader.embed_query)` and
  `method=RealmReader.embed_documents` (doc_encoder="trainable" only).
  """
  cfg: Any

  def setup(self):
    s = self.spec = Spec.from_config(self.cfg)
    self.reader = Transformer(s)
    self.query_encoder = PooledEncoder(s, s.option("retriever_dim"))
    if s.option("doc_encoder") == "trainable":
      self.doc_encoder = PooledEncoder(s, s.option("embedding_dim"), zero_out=True)
    self.candidate_proj_ExR = self.param(
        "candidate_proj", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                       (None, None)),
        (s.option("embedding_dim"), s.option("retriever_dim")))
    self.null_score = self.param("null_score",
                                 nn.with_logical_partitioning(nn.initializers.zeros, ()), ())

  def embed_query(self, tokens_BxM: jax.Array, deterministic: bool = True) -> jax.Array:
    """Query vectors in the index space [B, embedding_dim] (float32): W^T q(tokens) / sqrt(R).

    The 1/sqrt(retriever_dim) keeps the initial retrieval logits O(1), as in attention:
    unscaled dot products of the pooled encoders are O(10-100), which makes p(z|x) one-hot
    from the first step and starves the retriever of gradient.
    """
    q_BxR = self.query_encoder(tokens_BxM, deterministic)
    return (q_BxR @ self.candidate_proj_ExR.T) * self.spec.option("retriever_dim") ** -0.5

  def embed_documents(self, tokens_NxM: jax.Array, stale_NxE: jax.Array,
                      deterministic: bool = True) -> jax.Array:
    """Document vectors in the index space [N, embedding_dim] (float32): the stale
    embeddings of the chunks plus the trainable encoder's correction."""
    if self.spec.option("doc_encoder") != "trainable":
      raise UserError("embed_documents needs model.realm.doc_encoder='trainable'; with "
                      "'stale' the index vectors are fixed: re-query them with embed_query")
    return stale_NxE.astype(jnp.float32) + self.doc_encoder(tokens_NxM, deterministic)

  def retrieval_logits(self, inputs_BxL: jax.Array, candidates_BxKxM: jax.Array,
                       candidate_embeddings_BxKxE: jax.Array | None,
                       deterministic: bool = True) -> jax.Array:
    """Scores [B, K+1] of the null document (index 0) and the K candidates."""
    s = self.spec
    B, K, M = candidates_BxKxM.shape
    if candidate_embeddings_BxKxE is None:
      raise UserError("REALM needs batch['candidate_embeddings'] (the candidates' stale "
                      "index embeddings); build the REALM candidates first")
    if candidate_embeddings_BxKxE.shape[-1] != s.option("embedding_dim"):
      raise UserError(f"candidate embeddings have width {candidate_embeddings_BxKxE.shape[-1]}, "
                      f"model.realm.embedding_dim is {s.option('embedding_dim')}; set it to the "
                      "index's embedding width")
    emb_BxKxE = candidate_embeddings_BxKxE.astype(jnp.float32)
    if s.option("doc_encoder") == "trainable":
      emb_BxKxE = self.embed_documents(candidates_BxKxM.reshape(B * K, M),
                                       emb_BxKxE.reshape(B * K, -1),
                                       deterministic).reshape(B, K, -1)
    q_BxE = self.embed_query(inputs_BxL[:, :s.chunk_size], deterministic)
    scores_BxK = jnp.einsum("be,bke->bk", q_BxE, emb_BxKxE)
    # The null document scores as the mean candidate plus a learned offset. With a constant
    # null score the retriever collapses onto the null within ~20 steps: the candidates'
    # embeddings share a mean direction, so the encoders can lower every candidate's score at
    # once, many parameters moving together, while a scalar moves lr per step under Adam.
    # Relative to the mean, only the offset decides how much mass goes to "no retrieval".
    # A per-query constant does not change the ranking, so the index search stays exact.
    null_Bx1 = self.null_score + jnp.mean(scores_BxK, axis=1, keepdims=True)
    return jnp.concatenate([null_Bx1, scores_BxK], axis=1)

  def __call__(self, inputs_BxL: jax.Array, candidates_BxKxM: jax.Array,
               candidate_embeddings_BxKxE: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    s = self.spec
    B, L = inputs_BxL.shape
    if candidates_BxKxM.ndim != 3 or candidates_BxKxM.shape[2] != s.chunk_size:
      raise UserError(f"REALM candidates have shape {tuple(candidates_BxKxM.shape)}; expected "
                      f"[B, K, model.chunk_size={s.chunk_size}]")
    if L < s.chunk_size:
      raise UserError(f"REALM inputs of length {L} are shorter than the query chunk "
                      f"(model.chunk_size={s.chunk_size}); raise data.seq_len")
    _, K, M = candidates_BxKxM.shape
    retrieval_BxZ = self.retrieval_logits(inputs_BxL, candidates_BxKxM,
                                          candidate_embeddings_BxKxE, deterministic)
    Z = K + 1
    docs_BxZxM = jnp.concatenate([jnp.zeros((B, 1, M), candidates_BxKxM.dtype),
                                  candidates_BxKxM], axis=1)
    seq_BxZxT = jnp.concatenate(
        [docs_BxZxM, jnp.broadcast_to(inputs_BxL[:, None], (B, Z, L)).astype(docs_BxZxM.dtype)],
        axis=2)
    valid_BxZxT = jnp.concatenate([docs_BxZxM != 0, jnp.ones((B, Z, L), bool)], axis=2)
    logits_NxTxV = self.reader(seq_BxZxT.reshape(B * Z, M + L), deterministic,
                               valid_BxL=valid_BxZxT.reshape(B * Z, M + L))
    return retrieval_BxZ, logits_NxTxV[:, M:].reshape(B, Z, L, -1)


def loss(spec: Spec):
  """The negative marginal log-likelihood, normalised by the batch's weighted tokens.

  The weights before position m-1 (m = model.chunk_size) are zeroed, because the query
  inputs[:, :m] contains those targets. With mll_b = log p(y_b|x_b) from
  `marginal_log_likelihood`, nll_sum = -sum_b mll_b, tokens = sum of the remaining weights
  and loss = nll_sum / tokens. aux also has `retrieval_entropy` (mean over examples, nats)
  and `null_prob` (mean p(null|x)).
  """
  run = apply_fn(spec)

  def loss_fn(params, batch, rng):
    retrieval_BxZ, logits_BxZxLxV = run(params, batch, rng)
    targets_BxZxL = jnp.broadcast_to(batch["targets"][:, None], logits_BxZxLxV.shape[:3])
    logp_BxZxL = token_log_probs(logits_BxZxLxV, targets_BxZxL)
    weights_BxL = batch["weights"].astype(jnp.float32).at[:, :spec.chunk_size - 1].set(0.0)
    mll_B = marginal_log_likelihood(retrieval_BxZ, logp_BxZxL, weights_BxL)
    nll_sum = -jnp.sum(mll_B)
    tokens = jnp.sum(weights_BxL)
    pz_BxZ = jax.nn.softmax(retrieval_BxZ, axis=-1)
    entropy_B = -jnp.sum(pz_BxZ * jax.nn.log_softmax(retrieval_BxZ, axis=-1), axis=-1)
    aux = {"nll_sum": nll_sum, "tokens": tokens, "retrieval_entropy": jnp.mean(entropy_B),
           "null_prob": jnp.mean(pz_BxZ[:, 0])}
    return nll_sum / jnp.maximum(tokens, 1.0), aux

  return loss_fn


def inputs(spec: Spec, batch: Any) -> tuple:
  if "candidates" not in batch:
    raise UserError("REALM batches need 'candidates' (model.name=realm); build the REALM "
                    "candidates with the retrieval pipeline first")
  return batch["inputs"], batch["candidates"], batch.get("candidate_embeddings")


def example_batch(spec: Spec, batch_size: int, seq_len: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  batch = token_batch(spec, batch_size, seq_len, rng)
  K = spec.num_neighbours
  batch["candidates"] = rng.integers(1, spec.vocab_size, size=(batch_size, K, spec.chunk_size),
                                     dtype=np.int32)
  batch["candidate_embeddings"] = rng.standard_normal(
      (batch_size, K, spec.option("embedding_dim"))).astype(np.float32)
  return batch


def validate(config: Any) -> None:
  if config.model.realm.doc_encoder not in ("stale", "trainable"):
    raise UserError(f"model.realm.doc_encoder={config.model.realm.doc_encoder!r} is unknown; "
                    "use 'stale' or 'trainable'")


def refresh_every(config: Any) -> int:
  """Steps between index refreshes: retrieval.refresh_every with a trainable document
  encoder (the stale index moves only then), else 0 (frozen)."""
  trainable = config.model.realm.doc_encoder == "trainable"
  return config.retrieval.refresh_every if trainable else 0


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """REALM decoding from the exact marginal over the prompt's top-k chunks and the null
  document: p(y_t | x, y_<t) = sum_z p(z | x, y_<t) p(y_t | z, x, y_<t), the posterior
  p(z | x, y_<t) updated by every token after the query chunk. The citations of a chunk
  are the candidates with their posterior weight at its last token."""
  s, k, store = ctx.spec, ctx.k, ctx.store
  m = s.chunk_size
  tokens_BxT = ctx.tokens_BxT
  B, T = tokens_BxT.shape
  query_len_B = np.minimum(ctx.len_B, m)
  query_Bxm = np.where(np.arange(m) < query_len_B[:, None], tokens_BxT[:, :m], 0)
  ids_BxK, _ = store.search(query_Bxm, k)
  cand_BxKxM = store.windows(ids_BxK, m)
  live_BxK = ids_BxK >= 0
  cand_emb_BxKxE = np.where(live_BxK[..., None],
                            np.asarray(store.embeddings_NxE[np.where(live_BxK, ids_BxK, 0)]), 0)
  scores_BxZ = jax.jit(functools.partial(RealmReader(s).apply,
                                         method=RealmReader.retrieval_logits))(
      {"params": ctx.params}, jnp.asarray(query_Bxm), jnp.asarray(cand_BxKxM),
      jnp.asarray(cand_emb_BxKxE, jnp.float32))
  log_w_BxZ = np.asarray(jax.nn.log_softmax(scores_BxZ), np.float64)  # p(z | x), z=0 null
  Z = k + 1
  docs_NxM = np.concatenate([np.zeros((B, 1, m), np.int32), cand_BxKxM], 1).reshape(B * Z, m)
  step = ctx.decoder()
  cache = ctx.cache(B * Z, m + T)
  reader = ctx.params["reader"]
  _, cache = step(reader, cache, jnp.asarray(docs_NxM), valid_BxL=jnp.asarray(docs_NxM != 0))
  ones_Nx1 = jnp.ones((B * Z, 1), bool)
  trace: dict[int, dict[int, list]] = {b: {} for b in range(B)}
  for pos in ctx.positions("generate (REALM)"):
    tokens_Nx1 = np.repeat(tokens_BxT[:, pos:pos + 1], Z, axis=0)
    logits_Nx1xV, cache = step(reader, cache, jnp.asarray(tokens_Nx1), valid_BxL=ones_Nx1)
    logp_BxZxV = np.asarray(jax.nn.log_softmax(logits_Nx1xV[:, 0]), np.float64).reshape(B, Z, -1)
    post_BxZ = log_w_BxZ - np.logaddexp.reduce(log_w_BxZ, axis=1, keepdims=True)
    logp_BxV = np.logaddexp.reduce(post_BxZ[..., None] + logp_BxZxV, axis=1).astype(np.float32)
    ctx.draw(pos, logp_BxV)
    chosen_B = tokens_BxT[:, pos + 1]
    after_query_B = pos + 1 >= query_len_B
    log_w_BxZ = log_w_BxZ + np.where(after_query_B[:, None],
                                     logp_BxZxV[np.arange(B), :, chosen_B], 0.0)
    post_BxZ = np.exp(log_w_BxZ - np.logaddexp.reduce(log_w_BxZ, axis=1, keepdims=True))
    for b in range(B):
      if pos + 1 >= ctx.len_B[b]:
        trace[b][pos + 1] = [
            store.neighbour(i, score, cand_BxKxM[b, j], float(post_BxZ[b, j + 1]))
            for j, (i, score) in enumerate(zip(ids_BxK[b], np.asarray(scores_BxZ)[b, 1:]))
            if i >= 0]
  return lambda b, first, last: trace[b][last]


FAMILY = Family(
    name="realm", model=RealmReader, loss=loss, inputs=inputs, sample=sample,
    retrieval=lambda spec: RetrievalSpec(kind="candidates", k=spec.num_neighbours,
                                         length=spec.chunk_size,
                                         batch_keys=("candidates", "candidate_embeddings")),
    example_batch=example_batch, decoder=Transformer, validate=validate,
    refresh_every=refresh_every)
