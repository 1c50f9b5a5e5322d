"""Every named config parses, builds its model, and rejects bad overrides clearly."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import models
from common.errors import UserError
from configs import base
from models.layers import Spec


# Parameters without embeddings of the RETRO paper's models (Borgeaud et al. 2021, Table 2).
PAPER_PARAMS = {"baseline_172m": 132e6, "retro_172m": 172e6, "baseline_425m": 368e6,
                "retro_425m": 425e6}
TRACE_LEN = 128  # tokens the models are traced at (shapes, not lengths, are checked)


def _example_batch(cfg, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract inputs of one sequence of `length` tokens, with the retrieval inputs the
  family reads (RETRO: neighbours of every chunk; REALM: candidates and embeddings)."""
  spec = Spec.from_config(cfg.model)
  batch = models.get_family(spec).example_batch(spec, 1, length, np.random.default_rng(0))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _abstract_model(name: str) -> tuple:
  """(config, trace length, abstract params, abstract outputs) of a named config, traced
  abstractly (Flax builds a module lazily, so constructing it alone checks nothing;
  compiling the full-size configs would take minutes), at up to TRACE_LEN tokens."""
  cfg = configs.load(name)
  m, L = cfg.model, min(cfg.data.seq_len, TRACE_LEN)
  model = models.get_model(m)
  args = models.model_inputs(m, _example_batch(cfg, L))
  params = nn.unbox(jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), *a), args))["params"]
  out = jax.eval_shape(lambda p, a: model.apply({"params": p}, *a), params, args)
  return cfg, L, params, out


@pytest.mark.parametrize("name", configs.names())
def test_config_parses_and_builds_model(name):
  cfg, L, params, out = _abstract_model(name)
  assert cfg.name == name
  assert cfg.model.name in {"transformer", "retro", "realm", "knnlm", "incontext"}
  assert cfg.data.seq_len % cfg.model.chunk_size == 0
  assert cfg.model.neighbour_len == 2 * cfg.model.chunk_size
  assert all(1 <= layer <= cfg.model.num_layers for layer in cfg.model.cca_layers)
  m = cfg.model
  if m.name == "realm":
    retrieval, logits = out
    assert retrieval.shape == (1, m.num_neighbours + 1)
    assert logits.shape == (1, m.num_neighbours + 1, L, m.vocab_size)
  else:
    logits = out
    assert logits.shape == (1, L, m.vocab_size)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  # The decoder's parameters sit at the top (REALM's reader too: a baseline's paths).
  assert params["embed"]["embedding"].shape == (m.vocab_size, m.width)
  blocks = sorted(k for k in params if k.startswith("blocks_"))
  assert len(blocks) == m.num_layers
  cca = {int(k.split("_")[1]) + 1 for k in blocks if "cross_attn" in params[k]}
  assert cca == (set(m.cca_layers) if m.name == "retro" else set())
  assert ("encoder" in params) == (m.name == "retro")
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert count > m.vocab_size * m.width + m.num_layers * m.width * m.mlp_dim


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_presets_have_the_papers_shapes_and_parameter_counts(name):
  """Built abstractly (jax.eval_shape), each preset's parameters without embeddings are
  within 10% of the paper's (ours lack the relative-position projections: 7-9% fewer),
  and RETRO's retrieval parameters (encoder + CCA) within 6% of the paper's 40M / 57M."""
  cfg, _, params, _ = _abstract_model(name)
  m, size = cfg.model, name.split("_")[1]
  assert (m.width, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim) == \
      base.PAPER_DECODERS[size]
  assert cfg.data.seq_len == 2048 and m.dtype == "bfloat16" and m.remat
  assert m.vocab_size == base.PAPER_VOCAB and m.cca_layers == (6, 9, 12)
  count = models.count_params(params, exclude_embeddings=True)
  print(f"{name}: {count / 1e6:.1f}M parameters without embeddings "
        f"(paper {PAPER_PARAMS[name] / 1e6:.0f}M)")
  assert abs(count / PAPER_PARAMS[name] - 1) <= 0.10
  if m.name == "retro":
    baseline = _abstract_model(f"baseline_{size}")[2]
    extra = count - models.count_params(baseline, exclude_embeddings=True)
    paper = PAPER_PARAMS[name] - PAPER_PARAMS[f"baseline_{size}"]
    assert abs(extra / paper - 1) <= 0.06, (extra, paper)


def test_bench_small_matches_the_issue():
  m = configs.load("bench_small").model
  assert (m.vocab_size, m.width, m.num_layers, m.num_heads, m.head_dim) == (8192, 256, 6, 4, 64)
  assert (m.encoder.width, m.encoder.num_layers, m.chunk_size, m.num_neighbours) == (128, 2, 64, 2)
  assert m.cca_layers == (3, 6) and m.dropout == 0.0 and m.dtype == "float32"


def test_overrides_typed():
  cfg = configs.load("retro_small", ["train.steps=70", "--config.model.dtype=bfloat16",
                                     "train.learning_rate=1", "model.cca_layers=[2,4]"])
  assert cfg.train.steps == 70 and cfg.model.dtype == "bfloat16"
  assert cfg.train.learning_rate == 1.0 and cfg.model.cca_layers == (2, 4)


def test_saved_configs_of_older_versions_load():
  """A run's config.json written before the null key and when the curriculum was a step
  count (300 of 600) reads as the model it trained: no null key, the first half copying."""
  saved = json.loads(configs.load("retro_fit").to_json())
  del saved["model"]["cca_null_kv"]
  del saved["train"]["copy_curriculum"]
  saved["train"].update(steps=600, copy_curriculum_steps=300)
  cfg = configs.from_json(json.dumps(saved))
  assert cfg.model.cca_null_kv is False and cfg.model.cca_smear_keys is True
  assert cfg.train.copy_curriculum == 0.5


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", "no field 'train.stepz'"),
    ("trian.steps=3", "no section 'trian'"),
    ("train.steps=abc", "expected int"),
    ("train.steps", "--config.field=value"),
])
def test_bad_override_is_one_line(override, words):
  with pytest.raises(UserError) as e:
    configs.load("retro_small", [override])
  assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_config_lists_names():
  with pytest.raises(UserError, match="retro_small"):
    configs.load("retro_smal")


# A bad value of each kind the validator checks, and the words its one-line error must hold.
BAD_VALUES = [
    ("data.batch_size=0", "data.batch_size=0 must be > 0"),
    ("eval.batch_size=-2", "eval.batch_size=-2 must be > 0"),
    ("data.seq_len=100", "data.seq_len=100 is not a positive multiple of the chunk size 64"),
    ("model.chunk_size=0", "model.chunk_size=0 must be > 0"),
    ("train.steps=0", "train.steps=0 must be > 0"),
    ("train.warmup_steps=100000", "train.warmup_steps=100000 exceeds train.steps"),
    ("train.learning_rate=0", "train.learning_rate=0.0 must be a finite number > 0"),
    ("train.learning_rate=float('nan')", "expected float"),
    ("train.learning_rate=1e400", "train.learning_rate=inf must be a finite number > 0"),
    ("train.b2=1.0", "train.b2=1.0 must be in [0, 1)"),
    ("train.min_lr_ratio=2.0", "train.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be > 0"),
    ("train.mesh_data=0", "train.mesh_data=0 must be -1 (all devices) or >= 1"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 must be in (0, 1)"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("model.num_neighbours=0", "model.num_neighbours=0 must be >= 1"),
    ("eval.num_neighbours=9", "eval.num_neighbours=9 must be in 0.."),
    ("eval.knn_lam=1.5", "eval.knn_lam=1.5 must be in [0, 1]"),
    ("eval.knn_temperature=0.0", "eval.knn_temperature=0.0 must be a finite number > 0"),
    ("retrieval.metric=cosine", "retrieval.metric='cosine' must be 'ip' or 'l2'"),
    ("retrieval.overfetch=0", "retrieval.overfetch=0 must be > 0"),
    ("model.name=gpt", "model.name='gpt' is unknown"),
    ("model.dtype=int8", "model.dtype='int8' is unsupported"),
    ("model.head_dim=15", "must be even"),
    ("model.attention=flash", "model.attention='flash' is unknown; use one of auto, xla"),
    ("model.loss_chunk=-1", "model.loss_chunk=-1 must be >= 0"),
]


@pytest.mark.parametrize("name", configs.names())
def test_every_config_rejects_each_bad_value_in_one_line(name):
  for override, words in BAD_VALUES:
    with pytest.raises(UserError) as e:
      configs.load(name, [override])
    assert words in str(e.value) and "\n" not in str(e.value), (override, str(e.value))


@pytest.mark.parametrize("name, override, words", [
    ("tiny_retro", "model.cca_layers=(5,)", "model.cca_layers=(5,) must be a non-empty subset"),
    ("tiny_realm", "model.realm.doc_encoder=frozen", "model.realm.doc_encoder='frozen' is unknown"),
    ("tiny_incontext", "model.incontext.stride=48", "model.incontext.stride=48 must be a "
                                                    "positive divisor of data.seq_len=128"),
    ("tiny_incontext", "model.loss_chunk=64", "model.loss_chunk=64: In-Context RALM's outputs"),
    ("tiny_realm", "model.loss_chunk=64", "model.loss_chunk=64 needs the decoder LM loss"),
])
def test_family_fields_are_validated_at_load(name, override, words):
  with pytest.raises(UserError) as e:
    configs.load(name, [override])
  assert words in str(e.value) and "\n" not in str(e.value)
