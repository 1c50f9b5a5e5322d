"""In-Context RALM: the family module, its equivalence with the decoder it wraps, REPLUG
ensembling, causality over blocks, and the seams it plugs into (train, eval, generate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import models
from models.incontext import InContext
from models.layers import Spec
from models.transformer import Transformer


def _apply(module, *args, **kwargs):
  """`module.apply` compiled once per shape (faster than op-by-op for these many ops)."""
  params, *inputs = args
  return jax.jit(lambda p, a, kw: module.apply({"params": p}, *a, **kw))(params, inputs, kwargs)


def _setup(k: int = 1, stride: int = 32, seq_len: int = 128):
  cfg = configs.load("tiny_incontext", [f"model.num_neighbours={k}",
                                        f"model.incontext.stride={stride}",
                                        f"data.seq_len={seq_len}"])
  spec = Spec.from_config(cfg.model)
  rng = np.random.default_rng(0)
  batch = models.get_family(spec).example_batch(spec, 2, seq_len, rng)
  batch["neighbours"][:, :, :, -7:] = 0  # documents end early: padding is masked
  params = models.init_params(cfg.model, jax.random.key(1), batch)
  return cfg, spec, params, batch


def test_parameters_are_the_decoders_and_no_neighbours_is_the_decoder():
  cfg, spec, params, batch = _setup()
  base = models.init_params(configs.load("tiny_transformer").model, jax.random.key(1),
                            {"inputs": batch["inputs"]})
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, base)
  plain = _apply(Transformer(spec), params, batch["inputs"])
  same = _apply(InContext(spec), params, batch["inputs"])
  np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))


def test_each_block_reads_its_document_then_the_whole_prefix():
  cfg, spec, params, batch = _setup(k=1, stride=32)
  x, nbr = batch["inputs"], batch["neighbours"]
  out = np.asarray(_apply(InContext(spec), params, x, nbr))
  dec = Transformer(spec)
  first = jax.nn.log_softmax(_apply(dec, params, x[:, :32]))
  np.testing.assert_allclose(out[:, :32], first, atol=1e-5)
  for j in (1, 3):  # block j = tokens [32j, 32j+32) reads window j-1's document
    doc = nbr[:, j - 1, 0]
    seq = np.concatenate([doc, x[:, :32 * (j + 1)]], axis=1)
    valid = np.concatenate([doc != 0, np.ones_like(x[:, :32 * (j + 1)], bool)], axis=1)
    ref = jax.nn.log_softmax(_apply(dec, params, seq, valid_BxL=valid)[:, -32:])
    np.testing.assert_allclose(out[:, 32 * j:32 * j + 32], ref, atol=1e-5)


def test_empty_documents_give_the_decoder():
  cfg, spec, params, batch = _setup(k=2)
  x = batch["inputs"]
  out = _apply(InContext(spec), params, x, np.zeros_like(batch["neighbours"]))
  ref = jax.nn.log_softmax(_apply(Transformer(spec), params, x))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_replug_ensemble_is_the_uniform_mixture_of_single_documents():
  cfg, spec, params, batch = _setup(k=2)
  x, nbr = batch["inputs"], batch["neighbours"]
  nbr[1, 2, 1] = 0  # row 1, window 2: only the first document was retrieved
  both = np.asarray(_apply(InContext(spec), params, x, nbr), np.float64)
  one = Spec.from_config(configs.load("tiny_incontext", ["model.num_neighbours=1",
                                                         "model.incontext.stride=32"]).model)
  p = [np.exp(np.asarray(_apply(InContext(one), params, x, nbr[:, :, i:i + 1]),
                         np.float64)) for i in range(2)]
  mix = np.log(0.5 * p[0] + 0.5 * p[1])
  mix[1, 96:] = np.log(p[0][1, 96:])  # block 3 of row 1 reads window 2: one document
  np.testing.assert_allclose(both, mix, atol=1e-5)


def test_a_windows_documents_reach_only_later_blocks():
  cfg, spec, params, batch = _setup(k=1, stride=32)
  x, nbr = batch["inputs"], batch["neighbours"]
  model = InContext(spec)

  def block_sums(n):
    return _apply(model, params, x, n.astype(np.int32)).sum(-1)

  # Token ids are integers: perturb window 1 and compare outputs instead of gradients.
  other = nbr.copy()
  other[:, 1] = np.random.default_rng(5).integers(1, spec.vocab_size, other[:, 1].shape)
  a, b = np.asarray(block_sums(nbr)), np.asarray(block_sums(other))
  np.testing.assert_array_equal(a[:, :64], b[:, :64])  # blocks 0 and 1 never read window 1
  assert np.abs(a[:, 64:96] - b[:, 64:96]).min() > 0  # block 2 reads it at every position
  np.testing.assert_array_equal(a[:, 96:], b[:, 96:])  # block 3 reads window 2 only


def test_validation_names_the_field():
  with pytest.raises(Exception, match=r"model.incontext.stride=48 must be a positive divisor "
                                      r"of data.seq_len=128"):
    configs.load("tiny_incontext", ["model.incontext.stride=48"])


def test_loss_is_the_lm_loss_of_the_mixture():
  cfg, spec, params, batch = _setup(k=2)
  loss, aux = jax.jit(models.make_loss_fn(cfg.model))(params, batch, None)
  logp = _apply(InContext(spec), params, batch["inputs"], batch["neighbours"])
  tgt = np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(aux["nll_sum"]), -tgt.sum(), rtol=1e-5)
  assert float(aux["tokens"]) == batch["weights"].sum()
