"""Model tests on the tiny configs: RETRO causality, REALM marginal, kNN-LM, dtypes, losses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import models
from common.errors import UserError
from models import knnlm
from models.realm import RealmReader, marginal_log_likelihood
from models.retro import Retro
from models.transformer import Transformer

M = 64  # chunk size of the tiny configs
V = 512  # vocab size of the tiny configs
# bench_small: embed 2,097,152 + lm_head 2,097,152 (untied) + 4 plain blocks x 786,944
# + 2 CCA blocks x 983,808 + neighbour encoder 623,744 + final norm 256.
EXPECTED_BENCH_SMALL_PARAMS = 9_933_696


def _tokens(seed: int, shape: tuple[int, ...], low: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), shape, low, V, dtype=jnp.int32)


def _lm_batch(seed: int, B: int, L: int) -> dict[str, jax.Array]:
  return {"inputs": _tokens(seed, (B, L)), "targets": _tokens(seed + 1, (B, L)),
          "weights": jnp.ones((B, L), jnp.float32)}


def _random_params(module: nn.Module, *args) -> dict:
  """LeCun-like random parameters from the abstract init: no init compilation (which
  costs seconds on CPU; `models.init_params` itself runs in the Transformer test)."""
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim <= 1:  # norm scales, null score
      return jnp.ones(leaf.shape, jnp.float32)
    fan_in = np.prod(leaf.shape[:-1]) if "'out'" in name else leaf.shape[0]
    std = 1.0 if "embedding" in name else fan_in ** -0.5
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def retro():
  """Tiny RETRO (C=2, K=2, R=128), its params, a jitted forward, and one example."""
  cfg = configs.load("tiny_retro").model
  inputs_BxL = _tokens(0, (1, 128))
  nbr_BxCxKxR = _tokens(1, (1, 2, 2, 128))
  nbr_BxCxKxR = nbr_BxCxKxR.at[..., 112:].set(0)  # padded tails
  model = Retro(cfg)
  params = _random_params(model, inputs_BxL, nbr_BxCxKxR)
  forward = jax.jit(lambda x, n: model.apply({"params": params}, x, n))
  return cfg, model, params, forward, inputs_BxL, nbr_BxCxKxR


def _changed_positions(a_BxLxV: jax.Array, b_BxLxV: jax.Array) -> np.ndarray:
  return np.nonzero(np.abs(np.asarray(a_BxLxV - b_BxLxV)).max(axis=(0, 2)) > 0)[0]


def test_retro_causality_by_perturbation(retro):
  _, _, _, forward, x, nbr = retro
  base = forward(x, nbr)
  for s in (5, 63, 64, 100):
    changed = _changed_positions(base, forward(x.at[0, s].set(x[0, s] % (V - 1) + 1), nbr))
    assert changed.min() == s, f"changing token {s} changed logits at {changed.min()}"
  for c in range(2):
    new_nbr = nbr.at[:, c].set(_tokens(10 + c, nbr[:, c].shape))
    changed = _changed_positions(base, forward(x, new_nbr))
    assert changed.size and changed.min() == (c + 1) * M - 1, (c, changed[:3])


def test_retro_causality_by_gradients(retro):
  """d logit_t / d embedding: zero for future tokens, for neighbours of chunk c before
  (c+1)m-1, and for padded neighbour tokens; non-zero where influence is allowed (with
  the only CCA layer last, chunk c's neighbours reach just its attending window)."""
  _, model, params, _, x, nbr = retro
  u_V = jax.random.normal(jax.random.PRNGKey(3), (V,))

  def logits_L(dx_BxLxD, dn_BxCxKxRxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        return out + (dx_BxLxD if out.ndim == 3 else dn_BxCxKxRxD)
      return out

    with nn.intercept_methods(add_delta):
      return model.apply({"params": params}, x, nbr)[0] @ u_V

  D = params["embed"]["embedding"].shape[1]
  jx, jn = jax.jit(jax.jacrev(logits_L, argnums=(0, 1)))(
      jnp.zeros((1, 128, D)), jnp.zeros((1, 2, 2, 128, D)))
  tok_TxS = np.abs(np.asarray(jx)).sum(axis=(1, 3))
  assert np.all(np.triu(tok_TxS, k=1) == 0)
  assert np.all(np.diag(tok_TxS) > 0)
  nbr_TxCxKxR = np.abs(np.asarray(jn)).sum(axis=(1, 5))
  pad_CxKxR = np.asarray(nbr[0] == 0)
  assert np.all(nbr_TxCxKxR[:, pad_CxKxR] == 0)
  for c in range(2):
    first = (c + 1) * M - 1  # the attending window of chunk c starts here
    assert np.all(nbr_TxCxKxR[:first, c] == 0)
    assert np.all(nbr_TxCxKxR[first:first + M, c][:, ~pad_CxKxR[c]].sum(-1) > 0)


def test_retro_partial_last_chunk(retro):
  """Length 100 (the last chunk incomplete) gives the first 100 logits of length 128,
  with neighbours for both chunks or only for the complete one."""
  _, model, params, forward, x, nbr = retro
  short = jax.jit(lambda x, n: (model.apply({"params": params}, x, n),
                                model.apply({"params": params}, x, n[:, :1])))
  both, first_only = short(x[:, :100], nbr)
  full = forward(x, nbr)
  np.testing.assert_allclose(both, full[:, :100], atol=1e-5)
  np.testing.assert_allclose(first_only, full[:, :100], atol=1e-5)
  with pytest.raises(UserError, match="neighbours have shape"):
    model.apply({"params": params}, x, nbr[:, :, :, :, None])


def test_retro_without_neighbours_is_the_transformer(retro):
  cfg, model, params, forward, x, nbr = retro
  plain, no_retrieval = jax.jit(lambda p, x: (Transformer(cfg).apply({"params": p}, x),
                                              model.apply({"params": p}, x)))(params, x)
  assert float(jnp.abs(plain - no_retrieval).max()) <= 1e-6
  assert float(jnp.abs(plain - forward(x, nbr)).max()) > 1e-3  # CCA does something
  assert set(params) == {"embed", "blocks_0", "blocks_1", "encoder", "final_norm", "lm_head"}
  assert "cross_attn" in params["blocks_1"] and "cross_attn" not in params["blocks_0"]


def test_bf16_forward_close_to_f32(retro):
  """bf16 compute, f32 params: |logit diff| <= 0.1 max, <= 0.015 mean (logit std ~1;
  measured 0.029 and 0.0047)."""
  _, _, params, forward, x, nbr = retro
  bf16 = configs.load("tiny_retro", ["model.dtype='bfloat16'"]).model
  shapes = jax.eval_shape(lambda r: Retro(bf16).init(r, x, nbr), jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  low = jax.jit(lambda x, n: Retro(bf16).apply({"params": params}, x, n))(x, nbr)
  assert low.dtype == jnp.float32
  diff = np.abs(np.asarray(low - forward(x, nbr)))
  assert diff.max() <= 0.1 and diff.mean() <= 0.015, (diff.max(), diff.mean())


def test_transformer_loss_key_dropout_remat():
  """Token-weighted CE vs numpy; kNN key; jit = eager; dropout only with an rng; remat
  changes nothing."""
  cfg = configs.load("tiny_knnlm", ["model.dropout=0.1"]).model
  remat = configs.load("tiny_knnlm", ["model.dropout=0.1", "model.remat=True"]).model
  batch = _lm_batch(0, 2, 64)
  batch["weights"] = batch["weights"].at[1, 10:].set(0.0)
  params = models.init_params(cfg, jax.random.PRNGKey(0), batch)
  model = models.get_model(cfg)
  assert isinstance(model, Transformer)
  grad = lambda c: jax.value_and_grad(models.make_loss_fn(c), has_aux=True)

  @jax.jit
  def run(params, batch):  # one compilation for everything (compiling dominates test time)
    rng = jax.random.PRNGKey(1)
    return (model.apply({"params": params}, batch["inputs"], return_key=True),
            models.make_loss_fn(cfg)(params, batch, None), grad(cfg)(params, batch, rng),
            grad(remat)(params, batch, rng))

  (logits, key_BxLxD), (loss, aux), ((drop, _), g), ((drop_r, _), g_r) = run(params, batch)
  np.testing.assert_allclose(model.apply({"params": params}, batch["inputs"]), logits, atol=1e-5)
  assert key_BxLxD.shape == (2, 64, 32) and key_BxLxD.dtype == jnp.float32
  # The key is RMS-normalised (the norm's scale is 1 at init).
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(key_BxLxD), -1)), 1.0, rtol=1e-3)
  logits64 = np.asarray(logits, np.float64)
  top = logits64.max(-1, keepdims=True)
  logp = logits64 - top - np.log(np.exp(logits64 - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  w = np.asarray(batch["weights"])
  assert float(aux["tokens"]) == 74.0
  np.testing.assert_allclose(aux["nll_sum"], (nll * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
  assert float(drop) != float(loss)
  np.testing.assert_allclose(drop_r, drop, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_r)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  axes = models.param_axes(cfg, batch)
  assert axes["blocks_0"]["mlp"]["wi"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert axes["lm_head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")


def test_realm_marginal_matches_float64_bruteforce():
  rng = np.random.default_rng(0)
  B, Z, L = 3, 5, 7
  scores = rng.normal(size=(B, Z)) * 3
  token_logp = -rng.exponential(size=(B, Z, L)) * 4
  weights = (rng.random((B, L)) > 0.3).astype(np.float64)
  got = marginal_log_likelihood(jnp.asarray(scores, jnp.float32),
                                jnp.asarray(token_logp, jnp.float32),
                                jnp.asarray(weights, jnp.float32))
  pz = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  py_z = np.exp((token_logp * weights[:, None]).sum(-1))
  np.testing.assert_allclose(got, np.log((pz * py_z).sum(-1)), rtol=1e-5)


def _realm_setup(doc_encoder: str):
  cfg = configs.load("tiny_realm", [f"model.realm.doc_encoder='{doc_encoder}'"]).model
  B, K, L = 2, 3, 96
  batch = _lm_batch(0, B, L)
  batch["candidates"] = _tokens(5, (B, K, M), low=0)
  batch["candidate_embeddings"] = jax.random.normal(jax.random.PRNGKey(6), (B, K, 384))
  model = RealmReader(cfg)
  params = _random_params(model, batch["inputs"], batch["candidates"],
                          batch["candidate_embeddings"])
  params["null_score"] = jnp.float32(0.5)
  loss_and_grad = jax.value_and_grad(models.make_loss_fn(cfg), has_aux=True)
  return cfg, model, params, batch, loss_and_grad


def _assert_retriever_gradients(grads: dict, names: list[str]):
  for name in names:
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads[name]))
    assert norm > 0.0, name


def test_realm_stale_null_document_and_gradients():
  cfg, model, params, batch, loss_and_grad = _realm_setup("stale")
  assert "doc_encoder" not in params
  B, K, L = 2, 3, 96

  @jax.jit
  def run(params, batch):  # one compilation for everything (compiling dominates test time)
    v = {"params": params}
    return (model.apply(v, batch["inputs"], batch["candidates"], batch["candidate_embeddings"]),
            Transformer(cfg).apply({"params": params["reader"]}, batch["inputs"]),
            loss_and_grad(params, batch, None),
            model.apply(v, batch["inputs"][:, :M], method=RealmReader.embed_query))

  (retrieval_BxZ, logits_BxZxLxV), plain, ((loss, aux), grads), q_BxE = run(params, batch)
  assert retrieval_BxZ.shape == (B, K + 1) and logits_BxZxLxV.shape == (B, K + 1, L, V)
  # The null scores as the mean candidate plus its learned offset.
  np.testing.assert_allclose(retrieval_BxZ[:, 0], 0.5 + retrieval_BxZ[:, 1:].mean(1), rtol=1e-5)
  # The null document is empty: the reader then is the plain LM on the input alone.
  np.testing.assert_allclose(logits_BxZxLxV[:, 0], plain, atol=1e-4)
  # The loss is the marginal over the K+1 documents, from position m-1 on.
  targets = np.asarray(batch["targets"])[:, None, :, None]
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_BxZxLxV)), targets, -1)[..., 0]
  w = np.ones((B, L)) * (np.arange(L) >= M - 1)
  mll = marginal_log_likelihood(retrieval_BxZ, jnp.asarray(logp), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(aux["nll_sum"], -mll.sum(), rtol=1e-5)
  assert float(aux["tokens"]) == w.sum() and np.isclose(loss, -mll.sum() / w.sum())
  assert 0.0 < float(aux["null_prob"]) < 1.0 and float(aux["retrieval_entropy"]) > 0.0
  _assert_retriever_gradients(grads, ["query_encoder", "candidate_proj", "null_score", "reader"])
  # embed_query is in the index space: q . e reproduces the candidates' scores.
  np.testing.assert_allclose(jnp.einsum("be,bke->bk", q_BxE, batch["candidate_embeddings"]),
                             retrieval_BxZ[:, 1:], rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match="trainable"):
    model.apply({"params": params}, batch["candidates"][0], batch["candidate_embeddings"][0],
                method=RealmReader.embed_documents)


def test_realm_trainable_document_encoder_gradients():
  cfg, model, params, batch, loss_and_grad = _realm_setup("trainable")
  B, K = batch["candidates"].shape[:2]

  @jax.jit
  def run(params, batch):
    v = {"params": params}
    docs = batch["candidates"].reshape(B * K, M)
    stale = batch["candidate_embeddings"].reshape(B * K, -1)
    return (loss_and_grad(params, batch, None),
            model.apply(v, batch["inputs"], batch["candidates"], batch["candidate_embeddings"],
                        method=RealmReader.retrieval_logits),
            model.apply(v, batch["inputs"][:, :M], method=RealmReader.embed_query),
            model.apply(v, docs, stale, method=RealmReader.embed_documents))

  (_, grads), retrieval_BxZ, q_BxE, d_NxE = run(params, batch)
  _assert_retriever_gradients(grads, ["query_encoder", "doc_encoder", "candidate_proj",
                                      "null_score", "reader"])
  np.testing.assert_allclose(jnp.einsum("be,bke->bk", q_BxE, d_NxE.reshape(B, K, -1)),
                             retrieval_BxZ[:, 1:], rtol=1e-4, atol=1e-4)
  # The encoder's output layer starts at zero: at init the documents are the stale vectors.
  init = models.init_params(cfg, jax.random.PRNGKey(0), batch)
  stale = batch["candidate_embeddings"].reshape(B * K, -1)
  np.testing.assert_array_equal(
      model.apply({"params": init}, batch["candidates"].reshape(B * K, M), stale,
                  method=RealmReader.embed_documents), stale)


def test_knn_log_probs_matches_numpy():
  rng = np.random.default_rng(0)
  B, L, K, T = 2, 3, 6, 2.0
  dists = rng.exponential(size=(B, L, K)) * 5
  tokens = rng.integers(0, 8, size=(B, L, K))  # repeats: probabilities must add up
  got = np.asarray(knnlm.knn_log_probs(jnp.asarray(dists), jnp.asarray(tokens), 10, T))
  w = np.exp(-dists / T)
  w /= w.sum(-1, keepdims=True)
  want = np.zeros((B, L, 10))
  for b, l, k in np.ndindex(B, L, K):
    want[b, l, tokens[b, l, k]] += w[b, l, k]
  np.testing.assert_allclose(np.exp(got), want, atol=1e-6)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.isneginf(got[..., 8:]))


def test_knn_target_log_probs_equals_the_full_distribution_at_the_target():
  rng = np.random.default_rng(3)
  dists = jnp.asarray(rng.uniform(0, 4, (2, 5, 6)), jnp.float32)
  dists = dists.at[0, 0, 0].set(jnp.inf)  # a missing hit
  tokens = jnp.asarray(rng.integers(0, 7, (2, 5, 6)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
  full = knnlm.knn_log_probs(dists, tokens, 7, 0.7)
  want = np.take_along_axis(np.asarray(full), np.asarray(targets)[..., None], -1)[..., 0]
  got = np.asarray(knnlm.knn_target_log_probs(dists, tokens, targets, 0.7))
  assert np.isneginf(want).any() and np.isfinite(want).any()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_knn_interpolate_endpoints():
  lm = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 10)))
  knn = knnlm.knn_log_probs(jnp.ones((2, 3, 4)), jnp.array([[[1, 2, 2, 3]] * 3] * 2), 10, 1.0)
  np.testing.assert_array_equal(knnlm.interpolate(lm, knn, 0.0), lm)
  np.testing.assert_array_equal(knnlm.interpolate(lm, knn, 1.0), knn)
  mid = np.asarray(knnlm.interpolate(lm, knn, 0.25))
  np.testing.assert_allclose(np.exp(mid), 0.75 * np.exp(lm) + 0.25 * np.exp(knn), atol=1e-6)
  assert not np.isnan(mid).any()
  with pytest.raises(UserError):
    knnlm.interpolate(lm, knn, 1.5)


def test_bench_small_parameter_count():
  """Printed for comparison: the best public PyTorch RETRO at this config has 9.46M."""
  cfg = configs.load("bench_small").model
  batch = {"inputs": jnp.zeros((1, 512), jnp.int32),
           "neighbours": jnp.zeros((1, 8, 2, 128), jnp.int32)}
  axes = models.param_axes(cfg, batch)
  shapes = jax.eval_shape(lambda r: models.get_model(cfg).init(r, batch["inputs"],
                                                               batch["neighbours"]),
                          jax.random.PRNGKey(0))
  count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  print(f"bench_small RETRO parameters: {count:,} ({count / 1e6:.2f}M)")
  is_spec = lambda a: isinstance(a, jax.sharding.PartitionSpec)
  assert jax.tree_util.tree_structure(nn.unbox(shapes)["params"]) == \
      jax.tree_util.tree_structure(axes, is_leaf=is_spec)
  assert count == EXPECTED_BENCH_SMALL_PARAMS


def test_bad_config_is_a_user_error():
  with pytest.raises(UserError, match="cca_layers"):
    models.get_model(configs.load("tiny_retro", ["model.cca_layers=(3,)"]).model)
  with pytest.raises(UserError, match="dtype"):
    models.get_model(configs.load("tiny_retro", ["model.dtype='int8'"]).model)


def test_retro_learns_to_copy_its_neighbours_continuation():
  """Random tokens; chunk c's neighbour is chunk c plus its continuation (chunk c+1), as a
  datastore holding a copy of the text would return. Trained by the shared train step,
  RETRO must read the continuation through CCA: near-zero loss from position m-1 on (the
  shift), chance before it (no neighbour is visible yet), chance without retrieval."""
  from training import sharding
  from training.state import create_train_state
  from training.step import make_train_step

  steps, m = 300, 16
  cfg = configs.load("tiny_retro", [
      f"train.steps={steps}", "train.warmup_steps=10", "train.learning_rate=0.01",
      f"model.chunk_size={m}", f"model.neighbour_len={2 * m}", "model.num_neighbours=1"])
  B, L, C = 8, 256, 256 // m
  rng = np.random.default_rng(0)

  def batch() -> dict[str, np.ndarray]:
    toks_BxT = rng.integers(1, V, (B, L + m), dtype=np.int32)
    nbr_BxCx1xR = np.stack([toks_BxT[:, c * m:(c + 2) * m] for c in range(C)], 1)[:, :, None]
    return {"inputs": toks_BxT[:, :L], "targets": toks_BxT[:, 1:L + 1],
            "weights": np.ones((B, L), np.float32), "neighbours": nbr_BxCx1xR}

  mesh = sharding.make_mesh()
  state, shardings = create_train_state(cfg, jax.random.PRNGKey(0), batch(), mesh)
  step = make_train_step(cfg, models.make_loss_fn(cfg.model), shardings, mesh)
  for _ in range(steps):
    state, _ = step(state, batch())
  b = batch()
  model = models.get_model(cfg.model)
  nll = lambda *nbr: -np.asarray(models.token_log_probs(  # noqa: E731
      model.apply({"params": state.params}, b["inputs"], *nbr), b["targets"]))
  with_BxL, without_BxL = nll(b["neighbours"]), nll()
  chance = np.log(V - 1)
  assert with_BxL[:, m - 1:].mean() < 0.1 * chance, with_BxL[:, m - 1:].mean()
  assert with_BxL[:, :m - 1].mean() > 0.9 * chance
  assert without_BxL.mean() > 0.9 * chance
