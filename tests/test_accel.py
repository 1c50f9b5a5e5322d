"""Accelerator paths tested on CPU: attention implementations agree (splash in Pallas
interpret mode), the chunked loss equals the full one, model FLOPs match a hand count."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import models
from models import attention as attn
from models.layers import Spec
from training import flops as flops_lib

IMPLS = ("cpu_blocked", "xla", "splash")  # cudnn needs an NVIDIA GPU


def _qkv(seed: int, B: int, T: int, S: int, H: int = 2, K: int = 16) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, n, H, K), np.float32) for n in (T, S, S))
  return [q * K ** -0.5, k, v]


def _cases() -> dict[str, tuple]:
  """(q, k, v, mask, causal, the query rows that matter) of each kind of attention the
  models run (numpy data: eager JAX ops would each compile). Rows of padded queries are
  don't-care (never read: padded tokens are masked as keys, their outputs dropped):
  splash lets them see only themselves, the others also the valid keys. So are rows that
  see no key (RETRO zeroes their update)."""
  prefix_BxS = np.ones((2, 192), bool)
  prefix_BxS[0, 40:64] = prefix_BxS[1, 10:64] = False
  neighbours_BxS = np.ones((3, 64), bool)
  neighbours_BxS[0, 20:32] = neighbours_BxS[0, 50:] = False
  neighbours_BxS[2] = False  # a chunk without neighbours: no key
  encoder_BxS = np.ones((2, 32), bool)
  encoder_BxS[1, 24:] = False
  cca_rows_BxT = np.broadcast_to(neighbours_BxS.any(-1, keepdims=True), (3, 16))
  return {
      # Causal decoder over [REALM document (padded) ; input]: two cpu_blocked blocks.
      "causal_document_prefix": (*_qkv(0, 2, 192, 192), attn.KeyMask(prefix_BxS, True), True,
                                 prefix_BxS),
      # RETRO CCA: a chunk's m queries against K*R neighbour tokens, padding masked.
      "cca_padded_neighbours": (*_qkv(2, 3, 16, 64), attn.KeyMask(neighbours_BxS), False,
                                cca_rows_BxT),
      # The neighbour encoder: bidirectional, padding masked, each token sees itself.
      "encoder_padded": (*_qkv(3, 2, 32, 32), attn.KeyMask(encoder_BxS, True), False,
                         encoder_BxS),
      "causal": (*_qkv(1, 1, 128, 128), None, True, np.ones((1, 128), bool)),
  }


def _results(cases: dict[str, tuple], impls: tuple[str, ...]) -> dict:
  """{(case, impl): (attention, d<attention, u>/d(q, k, v))} in one compilation, the
  arrays passed as arguments (as constants XLA would fold the whole computation, slowly).
  Rows that do not matter are zeroed."""
  rng = np.random.default_rng(9)
  arrays = {name: (*case[:4], case[5], rng.standard_normal(case[0].shape, np.float32))
            for name, case in cases.items()}

  def run(arrays):
    out = {}
    for name, (q, k, v, mask, rows_BxT, u) in arrays.items():
      keep = rows_BxT[:, :, None, None]
      u = u * keep
      for impl in impls:
        f = lambda q, k, v: attn.attention(q, k, v, mask, cases[name][4], impl) * keep  # noqa: E731
        out[name, impl] = f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * u),
                                               argnums=(0, 1, 2))(q, k, v)
    return out

  return jax.jit(run)(arrays)


def _assert_close(got, want, atol: float, what: str):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=atol, err_msg=what)


def test_attention_implementations_agree_in_value_and_gradient():
  """xla equals cpu_blocked for every kind of mask, in value and gradient, also in
  bfloat16; splash too on the REALM document prefix (padding + causal, the widest mask;
  its other cases are the slow test below: Pallas interpret mode compiles for seconds).
  Unmasked causal attention runs through a model in the chunked-loss test."""
  cases = {k: v for k, v in _cases().items() if k != "causal"}
  results = _results(cases, ("cpu_blocked", "xla"))
  for name in cases:
    _assert_close(results[name, "xla"], results[name, "cpu_blocked"], 2e-5, name)
  prefix = {"causal_document_prefix": cases["causal_document_prefix"]}
  splash = _results(prefix, ("splash",))["causal_document_prefix", "splash"]
  _assert_close(splash, results["causal_document_prefix", "cpu_blocked"], 2e-5, "splash")
  # A row that sees no key gets the mean of the values (RETRO then zeroes its update).
  q, k, v, mask, _, _ = cases["cca_padded_neighbours"]
  low = {"cca": cases["cca_padded_neighbours"][:3]} | {
      "prefix": [jnp.asarray(x, jnp.bfloat16) for x in cases["causal_document_prefix"][:3]]}
  outs = jax.jit(lambda a: {
      "empty": [attn.attention(*a["cca"], mask, False, i)[2] for i in ("cpu_blocked", "xla")],
      "bf16": attn.attention(*a["prefix"], prefix["causal_document_prefix"][3], True, "xla")})(low)
  for out in outs["empty"]:
    np.testing.assert_allclose(out, np.broadcast_to(v[2].mean(0), out.shape), atol=1e-6)
  rows_BxT = cases["causal_document_prefix"][5][:, :, None, None]
  assert outs["bf16"].dtype == jnp.bfloat16
  np.testing.assert_allclose(outs["bf16"].astype(jnp.float32) * rows_BxT,
                             results["causal_document_prefix", "cpu_blocked"][0], atol=0.05)


@pytest.mark.slow
def test_splash_agrees_on_every_mask_and_in_bfloat16():
  """Splash (interpret mode) equals cpu_blocked on each kind of mask, value and gradient,
  and within bfloat16 tolerance in bfloat16."""
  cases = _cases()
  want, got = _results(cases, ("cpu_blocked",)), _results(cases, ("splash",))
  for name in cases:
    _assert_close(got[name, "splash"], want[name, "cpu_blocked"], 2e-5, name)
  q, k, v, mask, causal, rows_BxT = cases["causal_document_prefix"]
  low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  out = jax.jit(lambda q, k, v: attn.attention(q, k, v, mask, causal, "splash"))(*low)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32) * rows_BxT[:, :, None, None],
                             want["causal_document_prefix", "cpu_blocked"][0], atol=0.05)


def test_attention_field_resolves_by_platform_and_falls_back():
  assert attn.resolve("auto") == "cpu_blocked"  # this test runs on CPU
  assert [attn.resolve(i) for i in IMPLS] == list(IMPLS)
  q = jnp.zeros((1, 64, 2, 16))
  assert not attn._cudnn_takes(q, 64, 64)  # float32: cuDNN flash needs bf16/fp16
  assert attn._cudnn_takes(q.astype(jnp.bfloat16), 64, 64)
  assert attn._splash_tile(2048) == 512 and attn._splash_tile(2176) == 128
  with pytest.raises(ValueError, match="flash"):
    attn.resolve("flash")


@pytest.mark.slow
@pytest.mark.parametrize("name, length", [("tiny_retro", 128), ("tiny_realm", 96)])
def test_models_agree_across_attention_implementations(name, length):
  """The same parameters give the same outputs with every implementation: RETRO (causal
  decoder, CCA over padded neighbours, encoder) and REALM (causal reader over a padded
  document prefix)."""
  cfg = configs.load(name)
  spec = Spec.from_config(cfg.model)
  batch = models.get_family(spec).example_batch(spec, 2, length, np.random.default_rng(0))
  for key in ("neighbours", "candidates"):
    if key in batch:
      batch[key][0, ..., -9:] = 0  # padded tails
      batch[key][1, 0] = 0  # nothing retrieved
  params = models.init_params(cfg.model, jax.random.PRNGKey(0), batch)
  outs = {}
  for impl in IMPLS:
    model = models.get_model(configs.load(name, [f"model.attention={impl}"]).model)
    outs[impl] = jax.jit(lambda p, b: model.apply({"params": p}, *models.model_inputs(
        cfg.model, b)))(params, batch)
  for impl in IMPLS[1:]:
    _assert_close(outs[impl], outs["cpu_blocked"], 2e-5, impl)


def _params(cfg, batch) -> dict:
  """Random parameters of the abstract init's shapes (compiling `init` costs seconds)."""
  model = models.get_model(cfg.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             *models.model_inputs(cfg.model, batch)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * (
      s.shape[0] ** -0.5 if s.ndim > 1 else 1.0), nn.unbox(shapes)["params"])


def _loss_and_grads(name: str, overrides: list[str]) -> list:
  """(loss, aux), grads of the full loss and of the loss with `overrides`, and the
  second program's StableHLO; one decoder layer (compiling dominates the time)."""
  cfg = configs.load(name, ["model.num_layers=1", "model.cca_layers=(1,)"])
  spec = Spec.from_config(cfg.model)
  batch = models.get_family(spec).example_batch(spec, 2, 128, np.random.default_rng(1))
  batch["weights"][1, 100:] = 0.0
  params = _params(cfg, batch)
  out = []
  for c in (cfg, configs.load(name, ["model.num_layers=1", "model.cca_layers=(1,)",
                                     *overrides])):
    lowered = jax.jit(jax.value_and_grad(models.make_loss_fn(c.model), has_aux=True)).lower(
        params, batch, None)
    out.append(lowered.compile()(params, batch, None))
  return [*out, lowered.as_text()]


def test_chunked_loss_and_xla_attention_equal_the_default_in_value_and_gradient():
  """The decoder's loss with loss_chunk=48 (no divisor of the 128 positions) and
  attention=xla equals the default (full logits, cpu_blocked): loss, aux and gradients,
  and the chunked program has no [B, L, V] array, only [B, 48, V] blocks; the bare
  function too."""
  ((loss, aux), g), ((loss_c, aux_c), g_c), hlo = _loss_and_grads(
      "tiny_transformer", ["model.loss_chunk=48", "model.attention=xla"])
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  np.testing.assert_allclose(aux_c["nll_sum"], aux["nll_sum"], rtol=1e-6)
  _assert_close(g_c, g, 1e-6, "gradients")
  assert "x128x512xf32>" not in hlo and "<2x48x512xf32>" in hlo
  rng = np.random.default_rng(2)
  h_BxLxD, w_DxV = rng.standard_normal((3, 50, 8)), rng.standard_normal((8, 40))
  t_BxL = rng.integers(0, 40, (3, 50))
  full = lambda h, w: jnp.sum(models.token_log_probs(h @ w, t_BxL) ** 2)  # noqa: E731
  part = lambda h, w: jnp.sum(models.chunked_token_log_probs(  # noqa: E731
      lambda x: x @ w, h, t_BxL, 7) ** 2)
  _assert_close(jax.jit(jax.value_and_grad(part, (0, 1)))(h_BxLxD, w_DxV),
                jax.jit(jax.value_and_grad(full, (0, 1)))(h_BxLxD, w_DxV), 1e-3, "chunked")


@pytest.mark.slow
def test_retro_chunked_loss_with_each_attention_equals_the_default():
  for impl in IMPLS[1:]:
    ((loss, _), g), ((loss_c, _), g_c), _ = _loss_and_grads(
        "tiny_retro", ["model.loss_chunk=48", f"model.attention={impl}"])
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    _assert_close(g_c, g, 1e-6, impl)


def test_model_flops_match_a_hand_count():
  """tiny_retro: L=128, m=64 (C=2), K=2, R=128, D=32, 2 heads x 16, FFN 64, V=512, CCA in
  layer 2; encoder 16 wide, 1 layer, 2 heads x 8, FFN 32. Totals per sequence, by hand."""
  f = flops_lib.model_flops(configs.load("tiny_retro").model, 128)
  decoder = 2 * 128 * 2 * (4 * 32 * 32 + 2 * 32 * 64)  # 2 layers: q k v o, wi wo
  attention = 2 * 4 * 32 * (128 * 129 // 2)  # causal: query t sees t+1 keys
  head = 128 * 2 * 32 * 512
  nbr = 2 * 2 * 128  # C*K*R neighbour tokens
  cca = (128 * 4 * 32 * 32  # q and out projections at C*m = 128 positions
         + nbr * 4 * 16 * 32  # k and v of the 16-wide encoded neighbours
         + 4 * 32 * 128 * 256)  # each of C*m queries against K*R keys
  encoder = (nbr * 2 * 32 * 16  # input projection D -> E
             + nbr * 8 * 16 * 16 + 4 * 16 * nbr * 128  # self-attention within neighbours
             + nbr * 4 * 16 * 16 + 128 * 4 * 32 * 16 + 4 * 16 * nbr * 64  # to the chunk
             + nbr * 4 * 16 * 32)  # MLP
  want = dict(decoder=decoder, attention=attention, cca=cca, encoder=encoder, head=head)
  for part, total in want.items():
    assert getattr(f, part) * 128 == pytest.approx(total, rel=1e-12), part
  assert f.train == 3 * sum(want.values()) / 128
  plain = flops_lib.model_flops(configs.load("tiny_transformer").model, 128)
  assert plain.cca == plain.encoder == 0 and plain.decoder == f.decoder


def test_peak_table_by_device_kind():
  t = flops_lib.table_peak
  assert t("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert t("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert t("NVIDIA H200", "float32") == 495e12
  assert t("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
  assert t("NVIDIA L4", "bfloat16") == 121e12 and t("NVIDIA L40S", "bfloat16") is None
  assert t("Tesla T4", "float32") == 8.1e12
  assert t("TPU v4", "bfloat16") == 275e12
  assert t("TPU v5 lite", "bfloat16") == t("TPU v5e", "float32") == 197e12
  assert t("TPU v5p", "bfloat16") == t("TPU v5", "bfloat16") == 459e12
  assert t("TPU v6 lite", "bfloat16") == 918e12
  assert t("cpu", "float32") is None
