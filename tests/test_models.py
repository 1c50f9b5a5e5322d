"""Model tests on the tiny configs: RETRO causality, kNN-LM, dtypes, losses (REALM:
tests/test_realm.py)."""

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
from models.attention import KeyMask
from models.ops import Attention, rope
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


TRAINED_M = 16  # chunk size of the trained-layout model below


def _trained_layout(copy_recipe: bool):
  """RETRO with the layout of the trained configs (bench_small, retro_small): 6 decoder
  layers, CCA in layers 3 and 6, so the encoder reads the decoder states of a middle layer
  and later layers carry the neighbours' influence on. Tiny widths, m=16, 4 chunks.
  `copy_recipe`: with retro_fit's CCA (smeared keys and a null key and value)."""
  m = TRAINED_M
  cfg = configs.load("tiny_retro", ["model.num_layers=6", "model.cca_layers=(3,6)",
                                    f"model.chunk_size={m}", f"model.neighbour_len={2 * m}",
                                    f"model.cca_smear_keys={copy_recipe}",
                                    f"model.cca_null_kv={copy_recipe}"]).model
  inputs_BxL = _tokens(20, (1, 4 * m))
  nbr_BxCxKxR = _tokens(21, (1, 4, 2, 2 * m)).at[..., 2 * m - 5:].set(0)  # padded tails
  model = Retro(cfg)
  params = _random_params(model, inputs_BxL, nbr_BxCxKxR)
  forward = jax.jit(lambda x, n: model.apply({"params": params}, x, n))
  return cfg, model, params, forward, inputs_BxL, nbr_BxCxKxR


@pytest.fixture(scope="module")
def retro_trained_layout():
  return _trained_layout(False)


@pytest.fixture(scope="module")
def retro_copy_recipe():
  """The trained layout with smeared CCA keys and a null key (`model.cca_smear_keys`,
  `model.cca_null_kv`), both non-trivial (random parameters)."""
  return _trained_layout(True)


LAYOUTS = {"tiny": ("retro", M), "trained": ("retro_trained_layout", TRAINED_M),
           "copy_recipe": ("retro_copy_recipe", TRAINED_M)}


def _changed_positions(a_BxLxV: jax.Array, b_BxLxV: jax.Array) -> np.ndarray:
  return np.nonzero(np.abs(np.asarray(a_BxLxV - b_BxLxV)).max(axis=(0, 2)) > 0)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_retro_causality_by_perturbation(layout, request):
  """Changing token s changes logits from s on only; changing the neighbours of chunk c
  leaves every logit before (c+1)m-1 bit-identical and changes position (c+1)m-1. With CCA
  last (tiny), only chunk c's window (c+1)m-1 .. (c+2)m-2 changes; with CCA in a middle
  layer (trained) the change also reaches the positions after the window."""
  fixture, m = LAYOUTS[layout]
  cfg, _, _, forward, x, nbr = request.getfixturevalue(fixture)
  L, C = x.shape[1], nbr.shape[1]
  base = forward(x, nbr)
  for s in (5, m - 1, m, L - 28, L - 1):
    new = forward(x.at[0, s].set(x[0, s] % (V - 1) + 1), nbr)
    changed = _changed_positions(base, new)
    assert changed.min() == s, f"changing token {s} changed logits at {changed.min()}"
    np.testing.assert_array_equal(new[:, :s], base[:, :s])
  for c in range(C):
    first = (c + 1) * m - 1
    new = forward(x, nbr.at[:, c].set(_tokens(10 + c, nbr[:, c].shape)))
    np.testing.assert_array_equal(new[:, :first], base[:, :first], err_msg=f"chunk {c}")
    changed = _changed_positions(base, new)
    window = np.arange(first, min(first + m, L))
    if layout == "tiny":
      np.testing.assert_array_equal(changed, window, err_msg=f"chunk {c}")
    else:
      np.testing.assert_array_equal(changed, np.arange(first, L), err_msg=f"chunk {c}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_retro_causality_by_gradients(layout, request):
  """d logit_t / d embedding: zero for future tokens, for neighbours of chunk c before
  (c+1)m-1, and for padded neighbour tokens; non-zero where influence is allowed: with the
  only CCA layer last (tiny), chunk c's neighbours reach just its attending window; with
  CCA in layers 3 and 6 (trained), every position from (c+1)m-1 on."""
  fixture, m = LAYOUTS[layout]
  _, model, params, _, x, nbr = request.getfixturevalue(fixture)
  L, C, K, R = x.shape[1], *nbr.shape[1:]
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
      jnp.zeros((1, L, D)), jnp.zeros((1, C, K, R, D)))
  tok_TxS = np.abs(np.asarray(jx)).sum(axis=(1, 3))
  assert np.all(np.triu(tok_TxS, k=1) == 0)
  assert np.all(np.diag(tok_TxS) > 0)
  nbr_TxCxKxR = np.abs(np.asarray(jn)).sum(axis=(1, 5))
  pad_CxKxR = np.asarray(nbr[0] == 0)
  assert pad_CxKxR.any() and not pad_CxKxR.all(axis=(1, 2)).any()
  assert np.all(nbr_TxCxKxR[:, pad_CxKxR] == 0)
  for c in range(C):
    first = (c + 1) * m - 1  # the attending window of chunk c starts here
    reach = first + m if layout == "tiny" else L
    assert np.all(nbr_TxCxKxR[:first, c] == 0), c
    # Every position it may reach depends on every real neighbour token of chunk c.
    assert np.all(nbr_TxCxKxR[first:reach, c][:, ~pad_CxKxR[c]] > 0), c
    assert np.all(nbr_TxCxKxR[reach:, c] == 0), c


@pytest.mark.parametrize("layout", ["trained", "copy_recipe"])
def test_retro_cached_decoding_equals_full_forward_trained_layout(layout, request):
  """Token-by-token decoding with the cache (`models.init_cache`, decode=True) on the
  trained layout: the neighbours of chunk c arrive with its last token (c+1)m-1 and are
  encoded against the cached states of the middle CCA layer; the logits equal the full
  forward's, across three chunk boundaries and into a partial last chunk. One sequence
  has a chunk without neighbours and padded neighbour tails."""
  cfg, _, params, _, _, _ = request.getfixturevalue(LAYOUTS[layout][0])
  m, B, L = TRAINED_M, 2, 3 * TRAINED_M + 7
  x_BxL = _tokens(30, (B, L))
  nbr_BxCxKxR = _tokens(31, (B, L // m, 2, 2 * m))
  nbr_BxCxKxR = nbr_BxCxKxR.at[0, :, :, 20:].set(0).at[1, 1].set(0)
  full = jax.jit(models.get_model(cfg).apply)({"params": params}, x_BxL, nbr_BxCxKxR)
  decoder = models.get_decoder(cfg)
  cache = models.init_cache(cfg, B, L)
  step = jax.jit(lambda c, t, n: decoder.apply({"params": params, "cache": c}, t, n,
                                               decode=True, mutable=["cache"]))
  out = []
  for pos in range(L):
    done = pos % m == m - 1 and pos // m < nbr_BxCxKxR.shape[1]
    logits, mutated = step(cache, x_BxL[:, pos:pos + 1],
                           nbr_BxCxKxR[:, pos // m][:, None] if done else None)
    cache = mutated["cache"]
    out.append(logits)
  np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("null_kv", [False, True])
def test_cca_keys_equal_a_reference(null_kv):
  """`key_smear=R`: key j is (1-g) k_j + g k_{j-1} of its own group of R keys (before the
  rotary embedding), g = sigmoid(`smear`) per head; a group's first key is its own. With
  `null_kv`, every query also sees a null key whose logit is the unrotated query times
  `null_key` (scaled by 1/sqrt(K)), with value `null_value`. Checked against attention
  written out by hand, at gates other than 0.5, non-zero null parameters and a key mask."""
  H, K, D, R = 2, 8, 16, 4
  att = Attention(H, K, D, 10000.0, key_smear=R, null_kv=null_kv)
  x_BxTxD = jax.random.normal(jax.random.PRNGKey(0), (2, 3, D))
  kv_BxSxD = jax.random.normal(jax.random.PRNGKey(1), (2, 3 * R, D))
  valid_BxS = jnp.arange(3 * R)[None, :] < jnp.asarray([[3 * R], [R + 2]])
  pos_T, pos_S = (4, 5, 6), tuple(range(R)) * 3
  params = att.init(jax.random.PRNGKey(2), x_BxTxD, kv_BxSxD, pos_T, pos_S)["params"]
  params["smear"] = jnp.asarray([0.7, -1.3])
  if null_kv:
    params["null_key"] = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (H, K))
    params["null_value"] = jax.random.normal(jax.random.PRNGKey(4), (H, K))
  got = att.apply({"params": params}, x_BxTxD, kv_BxSxD, pos_T, pos_S, KeyMask(valid_BxS))

  project = lambda x, name: (x @ nn.unbox(params[name]["kernel"]).reshape(D, H * K)).reshape(
      *x.shape[:2], H, K)  # noqa: E731
  gate_H = jax.nn.sigmoid(params["smear"])
  k_BxSxHxK = project(kv_BxSxD, "key")
  smeared = [k_BxSxHxK[:, j] if j % R == 0 else
             (1 - gate_H[:, None]) * k_BxSxHxK[:, j] + gate_H[:, None] * k_BxSxHxK[:, j - 1]
             for j in range(3 * R)]
  k_BxSxHxK = rope(jnp.stack(smeared, 1), pos_S, 10000.0)
  q_BxTxHxK = project(x_BxTxD, "query")
  v_BxSxHxK = project(kv_BxSxD, "value")
  logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", rope(q_BxTxHxK, pos_T, 10000.0, K ** -0.5),
                              k_BxSxHxK)
  logits_BxHxTxS = jnp.where(valid_BxS[:, None, None], logits_BxHxTxS, -jnp.inf)
  if null_kv:
    null_BxHxTx1 = jnp.einsum("bthk,hk->bht", q_BxTxHxK, params["null_key"])[..., None]
    logits_BxHxTxS = jnp.concatenate([logits_BxHxTxS, null_BxHxTx1 * K ** -0.5], -1)
    v_BxSxHxK = jnp.concatenate(
        [v_BxSxHxK, jnp.broadcast_to(params["null_value"], (2, 1, H, K))], 1)
  probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, -1)
  out_BxTxHK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxSxHxK).reshape(2, 3, H * K)
  want = out_BxTxHK @ nn.unbox(params["out"]["kernel"]).reshape(H * K, D)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


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
  B, L, C = 8, 128, 128 // m
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
