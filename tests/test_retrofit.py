"""RETRO-fitting (the RETRO paper, section 4.3): a trained baseline's decoder, frozen, under
a fresh encoder and chunked cross-attention; `train.init_from` and `train.trainable`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import configs
import eval as eval_lib
import synthetic
import train
from common.errors import UserError
from models.layers import Spec
from models.retro import Retro
from models.transformer import Transformer
from training.state import param_path

STEPS = ["train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=2",
         "train.eval_every=100", "train.learning_rate=0.01"]


def _leaves(params) -> dict[str, np.ndarray]:
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_retrofitted_retro_with_retrieval_off_is_exactly_its_baseline(tmp_path):
  overrides = synthetic.corpus_overrides(tmp_path)
  train.train_and_evaluate(configs.load("tiny_transformer", [*overrides, *STEPS]),
                           str(tmp_path / "base"))
  fit = configs.load("tiny_retro", [*overrides, *STEPS, f"train.init_from={tmp_path / 'base'}",
                                    "train.trainable=['encoder', 'cross_']",
                                    # retro_fit's recipe: smeared keys, copy curriculum
                                    "model.cca_smear_keys=True", "train.copy_curriculum=0.5"])
  final = train.train_and_evaluate(fit, str(tmp_path / "fit"))
  _, base = train.load_checkpoint(tmp_path / "base")
  _, early = train.load_checkpoint(tmp_path / "fit", step=2)
  _, fitted = train.load_checkpoint(tmp_path / "fit")
  base, early, fitted = _leaves(base), _leaves(early), _leaves(fitted)
  for path, value in base.items():  # the decoder: copied, then frozen
    np.testing.assert_array_equal(fitted[path], value, err_msg=path)
  new = [p for p in fitted if p not in base]
  assert new and all("encoder" in p or "cross_" in p for p in new)
  assert all(not np.array_equal(early[p], fitted[p]) for p in new)  # these do train

  spec = Spec.from_config(fit.model)
  x = np.random.default_rng(0).integers(1, spec.vocab_size, (2, 128), dtype=np.int32)
  _, base_tree = train.load_checkpoint(tmp_path / "base")
  _, fit_tree = train.load_checkpoint(tmp_path / "fit")
  off = jax.jit(Retro(spec).apply)({"params": fit_tree}, x, None)
  ref = jax.jit(Transformer(spec).apply)({"params": base_tree}, x)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(ref))
  baseline = eval_lib.evaluate(tmp_path / "base", write=False)
  assert final["eval/no_retrieval/perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-6)
  assert final["eval/perplexity"] != final["eval/no_retrieval/perplexity"]

  wider = configs.load("tiny_retro", [*overrides, *STEPS, "model.width=64",
                                      f"train.init_from={tmp_path / 'base'}"])
  with pytest.raises(UserError, match=r"parameter blocks_0/attn/key/kernel has shape "
                                      r"\(32, 2, 16\) there and \(64, 2, 16\) here"):
    train.train_and_evaluate(wider, str(tmp_path / "wider"))
