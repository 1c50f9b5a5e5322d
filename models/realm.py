"""REALM (Guu et al. 2020) adapted to a causal LM: a retriever and a reader marginalised over z.

The query is the first chunk of the input, x_q = inputs[:, :m]. The retriever starts where
the index is (REALM warm-starts its retriever): it scores a document z as
s(x, z) = <q(x), d(z)> / T, T = `model.realm.temperature`, with
- q(x) = e_q + Q(x_q): e_q = batch["query_embedding"], the frozen embedder's vector of the
  query chunk (the one the candidate search used), plus a trainable residual encoder over
  the query tokens;
- d(z) = e_z + D(z): e_z = batch["candidate_embeddings"], the candidate's vector in the
  index, plus (doc_encoder="trainable") a trainable residual encoder over its tokens,
  recomputed in the step; with doc_encoder="stale", d(z) = e_z.
Both residuals' output layers start at zero, so at step 0 the scores are the index's inner
products / T: the retriever ranks the candidates as the search did, and the first index
refresh reproduces the stale index; training moves both sides from there.
`embed_query` returns q / T and `embed_documents` d, so a MIPS search of an index of
`embed_documents` vectors ranks by exactly s(x, z) (the stale-index refresh).

The null document (z = 0, an empty chunk) has its own learned vector n in document space,
scored by the same inner product: s(x, null) = <q(x), n> / T, so p(null|x) depends on x.
n starts at zero, the vector the embedder gives an empty chunk, so the null starts where the
index would rank an empty chunk (last: p(null|x) ~ 1e-5 on the default corpus) and rises as
far as the reader does better without a document. Unfilled candidates (id -1:
all padding tokens) are no documents: their retrieval logit is -inf, so p(z|x) = 0 and
the marginal, its gradient and the retrieval metrics are those over the filled ones.

The reader is a `Transformer` over [document ; input] with padded document tokens masked;
it predicts every input position given z. Its parameters sit at the model's top level
(`embed`, `blocks_*`, `final_norm`, `lm_head`), the paths of a baseline decoder, so
`train.init_from=<baseline workdir>` starts the reader from a pre-trained LM (REALM starts
from BERT); with the null document the reader then is exactly that LM.
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
from models.layers import Encoder, Spec, embed_init
from models.transformer import Transformer

# The batch's retrieval arrays, in the order of the model's inputs after `inputs`.
BATCH_KEYS = ("candidates", "candidate_embeddings", "query_embedding")


def marginal_log_likelihood(retrieval_logits_BxK: jax.Array, token_logp_BxKxL: jax.Array,
                            weights_BxL: jax.Array) -> jax.Array:
  """Per-example log p(y|x) = logsumexp_z(log_softmax(retrieval)_z + sum_t w_t log p(y_t|x,z)).

  A retrieval logit of -inf (an unfilled candidate) leaves z out of the sum."""
  log_pz_BxK = jax.nn.log_softmax(retrieval_logits_BxK.astype(jnp.float32), axis=-1)
  ll_BxK = jnp.sum(token_logp_BxKxL.astype(jnp.float32) * weights_BxL[:, None, :], axis=-1)
  return jax.nn.logsumexp(log_pz_BxK + ll_BxK, axis=-1)


def retrieval_metrics(retrieval_BxZ: jax.Array, ll_BxZ: jax.Array, example_B: jax.Array
                      ) -> dict[str, jax.Array]:
  """Means over the examples `example_B` (those with targets) of the retriever's diagnostics.

  `retrieval_entropy`: entropy of p(z|x) in nats (null included); `null_prob`: p(null|x);
  `gold_rank`: the gold candidate is the filled one whose reader log-likelihood of the
  targets `ll_BxZ` is highest (the posterior's favourite); its rank among the filled
  candidates by the retriever's score (0: the retriever's top candidate is the reader's
  favourite; random order averages (K-1)/2), over examples with a filled candidate.
  """
  log_pz_BxZ = jax.nn.log_softmax(retrieval_BxZ, axis=-1)
  pz_BxZ = jnp.exp(log_pz_BxZ)
  entropy_B = -jnp.sum(jnp.where(pz_BxZ > 0, pz_BxZ * log_pz_BxZ, 0.0), axis=-1)
  scores_BxK = retrieval_BxZ[:, 1:]
  live_BxK = jnp.isfinite(scores_BxK)
  gold_B = jnp.argmax(jnp.where(live_BxK, ll_BxZ[:, 1:], -jnp.inf), axis=-1)
  gold_score_Bx1 = jnp.take_along_axis(scores_BxK, gold_B[:, None], axis=-1)
  rank_B = jnp.sum(live_BxK & (scores_BxK > gold_score_Bx1), axis=-1)
  ranked_B = example_B & jnp.any(live_BxK, axis=-1)

  def mean(value_B: jax.Array, over_B: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(over_B, value_B, 0.0)) / jnp.maximum(jnp.sum(over_B), 1)

  return {"retrieval_entropy": mean(entropy_B, example_B),
          "null_prob": mean(pz_BxZ[:, 0], example_B),
          "gold_rank": mean(rank_B.astype(jnp.float32), ranked_B)}


class PooledEncoder(nn.Module):
  """Bidirectional encoder (model.encoder.* sizes) -> masked mean pool -> linear to out_dim,
  zero-initialised (a residual that starts as a no-op) and divided by its fan-in F.

  Under Adam every kernel entry moves by about the learning rate per step, so an output of
  the plain sum would move by F * lr: with F = 128 that rotates a unit query vector within
  a few steps and, through the direction all documents share, lowers every candidate's
  score at once until p(null|x) = 1 and the gradients vanish. Divided by F, each output
  moves by about lr per step, as each entry of the null document's vector does.
  """
  spec: Spec
  out_dim: int

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
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None))
    out_NxD = nn.Dense(self.out_dim, use_bias=False, kernel_init=init, name="out")(pooled_NxE)
    return out_NxD / e.width


class RealmReader(nn.Module):
  """Retriever + reader. `apply(vars, inputs_BxL, candidates_BxKxM, candidate_embeddings_BxKxE,
  query_embedding_BxE)`.

  Returns (retrieval_logits [B, K+1], reader logits [B, K+1, L, V]); index 0 is the null
  document, -inf marks an unfilled candidate. Separately callable:
  `method=RealmReader.retrieval_logits`, `embed_query` and `embed_documents`.
  """
  cfg: Any

  def setup(self):
    s = self.spec = Spec.from_config(self.cfg)
    self.reader = Transformer(s)
    nn.share_scope(self, self.reader)  # the reader's parameters at the top: a baseline's paths
    E = s.option("embedding_dim")
    self.query_encoder = PooledEncoder(s, E)
    if s.option("doc_encoder") == "trainable":
      self.doc_encoder = PooledEncoder(s, E)
    self.null_embedding_E = self.param(
        "null_embedding", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (E,))

  def _check_width(self, name: str, vectors: jax.Array | None) -> jax.Array:
    E = self.spec.option("embedding_dim")
    if vectors is None:
      raise UserError(f"REALM needs batch[{name!r}] (index-space vectors of the candidate "
                      "search); build the REALM candidates first")
    if vectors.shape[-1] != E:
      raise UserError(f"{name} has width {vectors.shape[-1]}, model.realm.embedding_dim is "
                      f"{E}; set it to the index's embedding width")
    return vectors.astype(jnp.float32)

  def embed_query(self, tokens_BxM: jax.Array, query_embedding_BxE: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """Query vectors in the index space [B, E] (float32): (e_q + Q(tokens)) / T."""
    e_BxE = self._check_width("query_embedding", query_embedding_BxE)
    q_BxE = e_BxE + self.query_encoder(tokens_BxM, deterministic)
    return q_BxE / self.spec.option("temperature")

  def embed_documents(self, tokens_NxM: jax.Array, stale_NxE: jax.Array,
                      deterministic: bool = True) -> jax.Array:
    """Document vectors in the index space [N, E] (float32): the chunks' stale embeddings,
    plus the trainable encoder's residual with doc_encoder="trainable"."""
    d_NxE = self._check_width("candidate_embeddings", stale_NxE)
    if self.spec.option("doc_encoder") == "trainable":
      d_NxE = d_NxE + self.doc_encoder(tokens_NxM, deterministic)
    return d_NxE

  def retrieval_logits(self, inputs_BxL: jax.Array, candidates_BxKxM: jax.Array,
                       candidate_embeddings_BxKxE: jax.Array | None,
                       query_embedding_BxE: jax.Array | None,
                       deterministic: bool = True) -> jax.Array:
    """Scores [B, K+1] of the null document (index 0) and the K candidates (-inf: unfilled,
    all padding)."""
    B, K, M = candidates_BxKxM.shape
    q_BxE = self.embed_query(inputs_BxL[:, :self.spec.chunk_size], query_embedding_BxE,
                             deterministic)
    stale_BxKxE = self._check_width("candidate_embeddings", candidate_embeddings_BxKxE)
    d_BxKxE = self.embed_documents(candidates_BxKxM.reshape(B * K, M),
                                   stale_BxKxE.reshape(B * K, -1), deterministic).reshape(B, K, -1)
    scores_BxK = jnp.einsum("be,bke->bk", q_BxE, d_BxKxE)
    live_BxK = jnp.any(candidates_BxKxM != 0, axis=-1)
    null_Bx1 = (q_BxE @ self.null_embedding_E)[:, None]
    return jnp.concatenate([null_Bx1, jnp.where(live_BxK, scores_BxK, -jnp.inf)], axis=1)

  def __call__(self, inputs_BxL: jax.Array, candidates_BxKxM: jax.Array,
               candidate_embeddings_BxKxE: jax.Array | None = None,
               query_embedding_BxE: jax.Array | None = None,
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
                                          candidate_embeddings_BxKxE, query_embedding_BxE,
                                          deterministic)
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
  and loss = nll_sum / tokens. aux also has `retrieval_metrics` (means over the examples
  with targets): `retrieval_entropy`, `null_prob`, `gold_rank`.
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
    ll_BxZ = jnp.sum(logp_BxZxL * weights_BxL[:, None], axis=-1)
    aux = {"nll_sum": nll_sum, "tokens": tokens,
           **retrieval_metrics(retrieval_BxZ, ll_BxZ, jnp.sum(weights_BxL, axis=-1) > 0)}
    return nll_sum / jnp.maximum(tokens, 1.0), aux

  return loss_fn


def inputs(spec: Spec, batch: Any) -> tuple:
  if "candidates" not in batch:
    raise UserError("REALM batches need 'candidates' (model.name=realm); build the REALM "
                    "candidates with the retrieval pipeline first")
  return (batch["inputs"], *(batch.get(key) for key in BATCH_KEYS))


def example_batch(spec: Spec, batch_size: int, seq_len: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  batch = token_batch(spec, batch_size, seq_len, rng)
  K, E = spec.num_neighbours, spec.option("embedding_dim")
  batch["candidates"] = rng.integers(1, spec.vocab_size, size=(batch_size, K, spec.chunk_size),
                                     dtype=np.int32)
  vectors = rng.standard_normal((batch_size, K + 1, E)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)  # unit, like the embedder's
  batch["candidate_embeddings"], batch["query_embedding"] = vectors[:, 1:], vectors[:, 0]
  return batch


def validate(config: Any) -> None:
  r = config.model.realm
  if r.doc_encoder not in ("stale", "trainable"):
    raise UserError(f"model.realm.doc_encoder={r.doc_encoder!r} is unknown; use 'stale' or "
                    "'trainable'")
  if not (np.isfinite(r.temperature) and r.temperature > 0):
    raise UserError(f"model.realm.temperature={r.temperature!r} must be a finite number > 0; "
                    "set --config.model.realm.temperature")


def refresh_every(config: Any) -> int:
  """Steps between index refreshes: retrieval.refresh_every with a trainable document
  encoder (the stale index moves only then), else 0 (frozen)."""
  trainable = config.model.realm.doc_encoder == "trainable"
  return config.retrieval.refresh_every if trainable else 0


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """REALM decoding from the exact marginal over the prompt's top-k chunks and the null
  document: p(y_t | x, y_<t) = sum_z p(z | x, y_<t) p(y_t | z, x, y_<t), the posterior
  p(z | x, y_<t) updated by every token after the query chunk. The citations of a chunk
  are the (filled) candidates with their posterior weight at its last token."""
  s, k, store = ctx.spec, ctx.k, ctx.store
  m = s.chunk_size
  tokens_BxT = ctx.tokens_BxT
  B, T = tokens_BxT.shape
  query_len_B = np.minimum(ctx.len_B, m)
  query_Bxm = np.where(np.arange(m) < query_len_B[:, None], tokens_BxT[:, :m], 0)
  query_BxE = store.embed(query_Bxm)
  ids_BxK, _ = store.search_vectors(query_BxE, k)
  cand_BxKxM = store.windows(ids_BxK, m)
  live_BxK = ids_BxK >= 0
  cand_emb_BxKxE = np.where(live_BxK[..., None],
                            np.asarray(store.embeddings_NxE[np.where(live_BxK, ids_BxK, 0)]), 0)
  scores_BxZ = jax.jit(functools.partial(RealmReader(s).apply,
                                         method=RealmReader.retrieval_logits))(
      {"params": ctx.params}, jnp.asarray(query_Bxm), jnp.asarray(cand_BxKxM),
      jnp.asarray(cand_emb_BxKxE, jnp.float32), jnp.asarray(query_BxE, jnp.float32))
  log_w_BxZ = np.asarray(jax.nn.log_softmax(scores_BxZ), np.float64)  # p(z | x), z=0 null
  Z = k + 1
  docs_NxM = np.concatenate([np.zeros((B, 1, m), np.int32), cand_BxKxM], 1).reshape(B * Z, m)
  step = ctx.decoder()
  cache = ctx.cache(B * Z, m + T)
  reader = ctx.params  # the decoder reads the reader's (top-level) parameters
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
                                         length=spec.chunk_size, batch_keys=BATCH_KEYS,
                                         query_len=spec.chunk_size),
    example_batch=example_batch, decoder=Transformer, validate=validate,
    refresh_every=refresh_every)
