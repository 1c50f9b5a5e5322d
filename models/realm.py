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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.errors import UserError
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
    self.query_encoder = PooledEncoder(s, s.retriever_dim)
    if s.doc_encoder == "trainable":
      self.doc_encoder = PooledEncoder(s, s.embedding_dim, zero_out=True)
    self.candidate_proj_ExR = self.param(
        "candidate_proj", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                       (None, None)),
        (s.embedding_dim, s.retriever_dim))
    self.null_score = self.param("null_score",
                                 nn.with_logical_partitioning(nn.initializers.zeros, ()), ())

  def embed_query(self, tokens_BxM: jax.Array, deterministic: bool = True) -> jax.Array:
    """Query vectors in the index space [B, embedding_dim] (float32): W^T q(tokens) / sqrt(R).

    The 1/sqrt(retriever_dim) keeps the initial retrieval logits O(1), as in attention:
    unscaled dot products of the pooled encoders are O(10-100), which makes p(z|x) one-hot
    from the first step and starves the retriever of gradient.
    """
    q_BxR = self.query_encoder(tokens_BxM, deterministic)
    return (q_BxR @ self.candidate_proj_ExR.T) * self.spec.retriever_dim ** -0.5

  def embed_documents(self, tokens_NxM: jax.Array, stale_NxE: jax.Array,
                      deterministic: bool = True) -> jax.Array:
    """Document vectors in the index space [N, embedding_dim] (float32): the stale
    embeddings of the chunks plus the trainable encoder's correction."""
    if self.spec.doc_encoder != "trainable":
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
    if candidate_embeddings_BxKxE.shape[-1] != s.embedding_dim:
      raise UserError(f"candidate embeddings have width {candidate_embeddings_BxKxE.shape[-1]}, "
                      f"model.realm.embedding_dim is {s.embedding_dim}; set it to the "
                      "index's embedding width")
    emb_BxKxE = candidate_embeddings_BxKxE.astype(jnp.float32)
    if s.doc_encoder == "trainable":
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
    if candidates_BxKxM.ndim != 3 or candidates_BxKxM.shape[2] != s.doc_len:
      raise UserError(f"REALM candidates have shape {tuple(candidates_BxKxM.shape)}; expected "
                      f"[B, K, model.realm.doc_len={s.doc_len}]")
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
