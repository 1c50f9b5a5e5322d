"""REALM on the tiny config: the marginal and its gradient, the null document scored by the
query, unfilled candidates masked, and the step-0 model of a warm start (the retriever ranks
as the index did, the reader with the null document is the baseline it started from)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import configs
import models
from models.realm import RealmReader, marginal_log_likelihood
from models.transformer import Transformer
from retrieval import index as index_lib
from test_models import _lm_batch, _random_params, _tokens
from training import checkpoint, sharding, state as state_lib

M = 64  # chunk size of the tiny configs
E = 384  # model.realm.embedding_dim (the embedder's width)


def _unit(seed: int, *shape: int) -> np.ndarray:
  """Random unit vectors [*shape, E], like the embedder's."""
  v = np.random.default_rng(seed).normal(size=(*shape, E)).astype(np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  top = x.max(-1, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def _prior_minus_posterior(scores_BxZ: np.ndarray, ll_BxZ: np.ndarray) -> np.ndarray:
  """float64 reference of d(-log p(y|x))/d retrieval_logits_z = p(z|x) - p(z|x,y), with
  ll_BxZ = log p(y|x,z): the prior softmax(scores) minus the posterior ~ prior * p(y|x,z)."""
  log_prior = _log_softmax64(scores_BxZ)
  return np.exp(log_prior) - np.exp(_log_softmax64(log_prior + np.asarray(ll_BxZ, np.float64)))


def test_realm_marginal_matches_float64_bruteforce():
  """log p(y|x) = log sum_z p(z|x) p(y|x,z), and its gradient with respect to the retrieval
  logits is the prior minus the posterior, both against float64 numpy."""
  rng = np.random.default_rng(0)
  B, Z, L = 3, 5, 7
  scores = rng.normal(size=(B, Z)) * 3
  token_logp = -rng.exponential(size=(B, Z, L)) * 0.5
  weights = (rng.random((B, L)) > 0.3).astype(np.float64)
  args32 = [jnp.asarray(a, jnp.float32) for a in (scores, token_logp, weights)]
  got, grad_BxZ = jax.jit(jax.value_and_grad(
      lambda s, *a: -marginal_log_likelihood(s, *a).sum()))(*args32)
  ll_BxZ = (token_logp * weights[:, None]).sum(-1)
  pz = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  want = -np.log((pz * np.exp(ll_BxZ)).sum(-1)).sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  want_grad = _prior_minus_posterior(scores, ll_BxZ)
  # The posterior differs from the prior (else the check would be the trivial zero).
  assert np.abs(want_grad).max() > 0.05, want_grad
  np.testing.assert_allclose(grad_BxZ, want_grad, atol=2e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(grad_BxZ).sum(-1), 0.0, atol=1e-6)


def test_realm_null_document_masking_and_gradients():
  """Trainable document encoder, random parameters, and a batch whose second example has
  one filled candidate of K=3 (the others unfilled: id -1, all padding, zero vectors)."""
  cfg = configs.load("tiny_realm", ["model.realm.doc_encoder='trainable'"]).model
  B, K, L = 2, 3, 96
  batch = _lm_batch(0, B, L)
  batch["candidates"] = _tokens(5, (B, K, M), low=0).at[1, 1:].set(0)
  batch["candidate_embeddings"] = jnp.asarray(_unit(6, B, K)).at[1, 1:].set(0.0)
  batch["query_embedding"] = jnp.asarray(_unit(7, B))
  model = RealmReader(cfg)
  params = _random_params(model, *models.model_inputs(cfg, batch))
  params["null_embedding"] = jnp.asarray(_unit(8))
  loss_fn = models.make_loss_fn(cfg)

  def loss_with_offset(params, offset_BxZ, batch):  # d loss / d offset = d loss / d logits
    def add_offset(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, RealmReader) and context.method_name == "retrieval_logits":
        return out + offset_BxZ
      return out

    with nn.intercept_methods(add_offset):
      return loss_fn(params, batch, None)

  @jax.jit
  def run(params, batch):  # one compilation for everything (compiling dominates test time)
    v = {"params": params}
    grad_fn = jax.value_and_grad(loss_with_offset, argnums=(0, 1), has_aux=True)
    return (model.apply(v, *models.model_inputs(cfg, batch)),
            grad_fn(params, jnp.zeros((B, K + 1)), batch),
            model.apply(v, batch["inputs"][:, :M], batch["query_embedding"],
                        method=RealmReader.embed_query),
            model.apply(v, batch["candidates"].reshape(B * K, M),
                        batch["candidate_embeddings"].reshape(B * K, E),
                        method=RealmReader.embed_documents))

  (retrieval_BxZ, logits_BxZxLxV), ((loss, aux), (grads, g_BxZ)), q_BxE, d_NxE = run(params, batch)
  scores = np.asarray(retrieval_BxZ, np.float64)
  assert logits_BxZxLxV.shape == (B, K + 1, L, cfg.vocab_size)
  # The null document is scored by the query: <q(x), n>, whatever the candidates.
  np.testing.assert_allclose(scores[:, 0], q_BxE @ params["null_embedding"], rtol=1e-5)
  assert abs(scores[0, 0] - scores[1, 0]) > 0.5, scores
  # Filled candidates: <q, d>, the vectors embed_query and embed_documents put in the index.
  qd_BxK = np.einsum("be,bke->bk", q_BxE, np.asarray(d_NxE).reshape(B, K, E))
  np.testing.assert_allclose(scores[0, 1:], qd_BxK[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scores[1, 1], qd_BxK[1, 0], rtol=1e-4, atol=1e-4)
  # Unfilled ones are no documents: logit -inf, p(z|x) = 0, no gradient.
  assert np.all(scores[1, 2:] == -np.inf) and np.isfinite(scores[0]).all()
  filled = [[0, 1, 2, 3], [0, 1]]  # the null and the filled candidates of each example
  # The marginal is the one over the filled candidates only (float64, from the same logits).
  w_L = (np.arange(L) >= M - 1).astype(np.float64)  # the query's targets drop
  logp = _log_softmax64(logits_BxZxLxV)
  targets = np.asarray(batch["targets"])[:, None, :, None]
  ll_BxZ = (np.take_along_axis(logp, targets, -1)[..., 0] * w_L).sum(-1)
  mll = [np.logaddexp.reduce(_log_softmax64(scores[b, z]) + ll_BxZ[b, z]) for b, z in
         enumerate(filled)]
  np.testing.assert_allclose(float(aux["nll_sum"]), -sum(mll), rtol=1e-5)
  assert float(aux["tokens"]) == B * w_L.sum() and np.isclose(loss, -sum(mll) / (B * w_L.sum()))
  # The gradient the retriever learns from: (p(z|x) - p(z|x,y)) / tokens, 0 where unfilled.
  for b, z in enumerate(filled):
    want = _prior_minus_posterior(scores[b, z], ll_BxZ[b, z])
    np.testing.assert_allclose(np.asarray(g_BxZ)[b, z] * float(aux["tokens"]), want, atol=1e-4)
  assert np.abs(_prior_minus_posterior(scores[0], ll_BxZ[0])).max() > 0.05  # not trivial
  assert np.all(np.asarray(g_BxZ)[1, 2:] == 0.0)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  for name in ("query_encoder", "doc_encoder", "null_embedding", "embed", "blocks_0"):
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads[name])) > 0, name
  # Diagnostics over the filled documents: p(null), entropy, the reader's favourite's rank.
  prior = [np.exp(_log_softmax64(scores[b, z])) for b, z in enumerate(filled)]
  np.testing.assert_allclose(float(aux["null_prob"]), np.mean([p[0] for p in prior]), rtol=1e-5)
  entropy = np.mean([-(p * np.log(p)).sum() for p in prior])
  np.testing.assert_allclose(float(aux["retrieval_entropy"]), entropy, rtol=1e-5)
  gold = int(np.argmax(ll_BxZ[0, 1:]))
  rank0 = int((scores[0, 1:] > scores[0, 1 + gold]).sum())  # example 1 has one filled: rank 0
  np.testing.assert_allclose(float(aux["gold_rank"]), rank0 / 2)


def test_realm_step0_of_a_warm_start(tmp_path):
  """`train.init_from` a baseline: the reader's parameters are the baseline's (same paths),
  the retriever ranks the candidates exactly as the index did (scores = index inner
  products / temperature, the null at the empty chunk's 0), and with the null document the
  reader's log-probabilities of the targets after the query are the baseline's."""
  base_cfg = configs.load("tiny_transformer").model
  B, L = 2, 128
  base = _random_params(Transformer(base_cfg), jnp.zeros((1, L), jnp.int32))
  hashes = {"tokenizer": "t", "dataset": "d"}
  with checkpoint.Checkpoints(tmp_path / "base") as ckpt:
    ckpt.save(7, {"params": base}, {"hashes": hashes})
  cfg = configs.load("tiny_realm", [f"train.init_from={tmp_path / 'base'}"])
  K, T = cfg.model.num_neighbours, cfg.model.realm.temperature
  # A datastore of 40 chunks with unit vectors in a flat inner-product index.
  vectors_NxE, queries_BxE = _unit(1, 40), _unit(2, B)
  chunks_NxM = np.asarray(_tokens(3, (40, M)))
  index = index_lib.build_index(vectors_NxE, "ip", "Flat")
  index_scores_BxK, ids_BxK = index_lib.search(index, queries_BxE, K)
  ids_BxK, index_scores_BxK = ids_BxK[:, ::-1], index_scores_BxK[:, ::-1]  # worst first
  batch = _lm_batch(4, B, L)
  batch.update(candidates=chunks_NxM[ids_BxK], candidate_embeddings=vectors_NxE[ids_BxK],
               query_embedding=queries_BxE)
  mesh = sharding.make_mesh(cfg.train)
  state, shardings = state_lib.create_train_state(cfg, jax.random.PRNGKey(0), batch, mesh)
  params = state_lib.warm_start(cfg, state, shardings, hashes).params
  leaves = lambda tree: {state_lib.param_path(p): v  # noqa: E731
                         for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  copied, here = leaves(base), leaves(params)
  assert set(copied) <= set(here)  # every baseline parameter has its path in the reader
  for path, value in copied.items():
    np.testing.assert_array_equal(here[path], value, err_msg=path)
  assert all(p.startswith(("query_encoder/", "null_embedding")) for p in set(here) - set(copied))

  (retrieval_BxZ, logits_BxZxLxV), base_logits_BxLxV = jax.jit(lambda p, b: (
      RealmReader(cfg.model).apply({"params": p}, *models.model_inputs(cfg.model, b)),
      Transformer(base_cfg).apply({"params": base}, b["inputs"])))(params, batch)
  np.testing.assert_allclose(np.asarray(retrieval_BxZ[:, 1:]) * T, index_scores_BxK, rtol=1e-5)
  order_BxK = np.argsort(-np.asarray(retrieval_BxZ[:, 1:]), axis=1, kind="stable")
  np.testing.assert_array_equal(np.take_along_axis(ids_BxK, order_BxK, 1), ids_BxK[:, ::-1])
  np.testing.assert_array_equal(retrieval_BxZ[:, 0], 0.0)
  targets = np.asarray(batch["targets"])[..., None]
  null_BxL = np.take_along_axis(_log_softmax64(logits_BxZxLxV[:, 0]), targets, -1)[..., 0]
  want_BxL = np.take_along_axis(_log_softmax64(base_logits_BxLxV), targets, -1)[..., 0]
  np.testing.assert_allclose(null_BxL[:, M - 1:], want_BxL[:, M - 1:], atol=2e-5, rtol=0)
