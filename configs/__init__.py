"""Named configs: `configs/<name>.py` defines `get_config()`; dotted overrides edit it.

    cfg = configs.load("retro_small", ["train.steps=10", "model.dtype=bfloat16"])
"""

from __future__ import annotations

import ast
import importlib
import math
import pkgutil
from typing import Sequence

import ml_collections

from common.errors import UserError

_NOT_CONFIGS = {"base"}


def names() -> list[str]:
  """All named configs in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_CONFIGS)


def get_config(name: str) -> ml_collections.ConfigDict:
  """The config `configs/<name>.py:get_config()`; UserError for an unknown name."""
  if name not in names():
    raise UserError(f"unknown config {name!r}; choose one of: {', '.join(names())} "
                    f"(files in configs/)")
  return importlib.import_module(f"configs.{name}").get_config()


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `a.b.c=value` override in place; UserError on unknown field or bad type."""
  key, sep, raw = override.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  if not sep or not key:
    raise UserError(f"override {override!r} is not of the form --config.field=value")
  *parents, leaf = key.split(".")
  node = cfg
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(f"config has no section {'.'.join(parents[:i + 1])!r} "
                      f"(in override {override!r}); see configs/base.py for the fields")
    node = node[part]
  if leaf not in node:
    raise UserError(f"config has no field {key!r}; fields here: {', '.join(sorted(node.keys()))}")
  old = node[leaf]
  value = _parse_value(raw)
  if isinstance(old, tuple) and isinstance(value, (list, int, str)):
    value = tuple(value) if isinstance(value, list) else (value,)
  if isinstance(old, str) and not isinstance(value, str):
    value = raw
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if type(old) is not type(value):
    raise UserError(f"--config.{key}={raw!r}: expected {type(old).__name__} "
                    f"(current value {old!r}), got {type(value).__name__}")
  node[leaf] = value


_POSITIVE = ("data.batch_size", "data.seq_len", "model.vocab_size", "model.chunk_size",
             "model.neighbour_len", "train.steps", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size",
             "eval.knn_k", "retrieval.embed_batch_size", "retrieval.embed_max_tokens",
             "retrieval.overfetch", "retrieval.nprobe", "retrieval.ef_search")
_NON_NEGATIVE = ("data.max_documents", "model.loss_chunk", "train.warmup_steps",
                 "train.stop_after", "train.weight_decay", "eval.batches",
                 "retrieval.refresh_every", "eval.score_from")
# field -> (test, what it must be): ranges that are not just "positive".
_RANGES = {
    "train.learning_rate": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "train.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "train.b1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.b2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.grad_clip": (math.isfinite, "finite (<= 0 turns clipping off)"),
    "train.mesh_data": (lambda v: v == -1 or v >= 1, "-1 (all devices) or >= 1"),
    "train.mesh_fsdp": (lambda v: v == -1 or v >= 1, "-1 (all devices) or >= 1"),
    "data.val_fraction": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "data.test_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "eval.knn_lam": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "eval.knn_temperature": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "retrieval.memory_budget_gb": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "retrieval.metric": (lambda v: v in ("ip", "l2"), "'ip' or 'l2'"),
}


def _field(cfg: ml_collections.ConfigDict, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every value before anything is built or run: ranges, the numbers several
  sections share (K, chunk size, sequence length, warmup) and the family's own fields;
  each violation is a one-line UserError naming the field (`configs.load` calls it)."""
  import models
  from models.family import get as get_family
  from models.layers import Spec

  rules = {**{f: (lambda v: v > 0, "> 0") for f in _POSITIVE},
           **{f: (lambda v: v >= 0, ">= 0") for f in _NON_NEGATIVE}, **_RANGES}
  for name, (ok, want) in rules.items():
    value = _field(cfg, name)
    if not ok(value):
      raise UserError(f"{name}={value!r} must be {want}; set --config.{name}")
  m, t = cfg.model, cfg.train
  fam = get_family(m.name)
  Spec.from_config(m)  # widths, heads, dtype, dropout
  if t.warmup_steps > t.steps:
    raise UserError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}; "
                    f"lower --config.train.warmup_steps")
  if m.num_neighbours < 1:
    raise UserError(f"model.num_neighbours={m.num_neighbours} must be >= 1 (K: the datastore "
                    "items retrieved per query)")
  if cfg.data.seq_len % m.chunk_size:
    fixed = max(m.chunk_size, round(cfg.data.seq_len / m.chunk_size) * m.chunk_size)
    raise UserError(f"data.seq_len={cfg.data.seq_len} is not a positive multiple of the chunk "
                    f"size {m.chunk_size}; set --config.data.seq_len={fixed}")
  if cfg.eval.score_from >= cfg.data.seq_len:
    raise UserError(f"eval.score_from={cfg.eval.score_from} leaves no scored target in a "
                    f"sequence of data.seq_len={cfg.data.seq_len}; use e.g. "
                    f"{m.chunk_size - 1} (REALM's query chunk) or 0")
  if not 0 <= cfg.eval.num_neighbours <= m.num_neighbours:
    raise UserError(f"eval.num_neighbours={cfg.eval.num_neighbours} must be in 0.."
                    f"{m.num_neighbours} (model.num_neighbours: the K retrieved; 0 = all)")
  if m.loss_chunk and fam.loss is not models.lm_loss:
    raise UserError(f"model.loss_chunk={m.loss_chunk} needs the decoder LM loss; model.name="
                    f"{m.name!r} has its own: set --config.model.loss_chunk=0")
  fam.validate(cfg)


def load(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The named config with overrides applied, validated, locked against new fields."""
  cfg = get_config(name)
  for override in overrides:
    apply_override(cfg, override)
  validate(cfg)
  cfg.lock()
  return cfg


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved (resolved) config: its named config with the saved values on top.

  JSON turns tuples into lists; they are turned back by the type of the named default.
  """
  import json

  saved = json.loads(text)
  realm = saved.get("model", {}).get("realm", {})
  if "num_candidates" in realm:  # written before K lived in model.num_neighbours alone
    saved["model"]["num_neighbours"] = realm.pop("num_candidates")
  if "model" in saved:  # written before smeared CCA keys or null keys: the model had none
    saved["model"].setdefault("cca_smear_keys", False)
    saved["model"].setdefault("cca_null_kv", False)
  train = saved.get("train", {})
  if "copy_curriculum_steps" in train:  # written when the curriculum was a step count
    train["copy_curriculum"] = train.pop("copy_curriculum_steps") / max(1, train["steps"])
  cfg = get_config(saved["name"]) if saved.get("name") in names() else \
      importlib.import_module("configs.base").base_config()

  def merge(node: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and key in node and isinstance(node[key],
                                                                  ml_collections.ConfigDict):
        merge(node[key], value)
      elif key in node and isinstance(node[key], tuple) and isinstance(value, list):
        node[key] = tuple(value)
      elif key in node:
        node[key] = type(node[key])(value) if isinstance(node[key], float) else value
      else:
        node[key] = value

  merge(cfg, saved)
  cfg.lock()
  return cfg
