"""Every named config parses, builds its model, and rejects bad overrides clearly."""

from __future__ import annotations

import pytest

import configs
import models
from common.errors import UserError


@pytest.mark.parametrize("name", configs.names())
def test_config_parses_and_builds_model(name):
  cfg = configs.load(name)
  assert cfg.name == name
  assert cfg.model.name in {"transformer", "retro", "realm", "knnlm"}
  assert cfg.data.seq_len % cfg.model.chunk_size == 0
  assert cfg.model.neighbour_len == 2 * cfg.model.chunk_size
  assert all(1 <= layer <= cfg.model.num_layers for layer in cfg.model.cca_layers)
  assert models.get_model(cfg.model) is not None


def test_bench_small_matches_the_issue():
  m = configs.load("bench_small").model
  assert (m.vocab_size, m.width, m.num_layers, m.num_heads, m.head_dim) == (8192, 256, 6, 4, 64)
  assert (m.encoder.width, m.encoder.num_layers, m.chunk_size, m.num_neighbours) == (128, 2, 64, 2)
  assert m.cca_layers == (3, 6) and m.dropout == 0.0 and m.dtype == "float32"


def test_overrides_typed():
  cfg = configs.load("retro_small", ["train.steps=7", "--config.model.dtype=bfloat16",
                                     "train.learning_rate=1", "model.cca_layers=[2,4]"])
  assert cfg.train.steps == 7 and cfg.model.dtype == "bfloat16"
  assert cfg.train.learning_rate == 1.0 and cfg.model.cca_layers == (2, 4)


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
