"""The interface every model family exports, and the lookup by `config.model.name`.

A family is one module `models/<name>.py` with a module-level `FAMILY = Family(...)`:

    family = models.family.get(config.model.name)      # importlib: models.<name>.FAMILY
    model = family.model(spec)                          # the Flax module
    loss, aux = family.loss(spec)(params, batch, rng)   # rng=None: no dropout (eval)
    request = family.retrieval(spec)                    # what it reads from the datastore

Code outside `models/` asks the family; it never compares the model name with a literal.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

from common.errors import UserError

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]

# Modules of this package that are building blocks, not families.
_NOT_FAMILIES = {"family", "layers"}


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  """What a family reads from the datastore for every training and evaluation sequence.

  kind "neighbours": for each query window of a sequence (one ends every `stride` tokens:
  window i is tokens [(i+1)*stride - query_len, (i+1)*stride), clipped to the sequence),
  the K nearest datastore chunks, each as `length` tokens from the chunk's start (chunk +
  continuation), arrays `neighbours` [S, L/stride, K, length] (+ ids, distances).
  RETRO is stride = query_len = chunk_size, length = 2 * chunk_size.
  kind "candidates": REALM, K chunks per sequence queried by its first chunk.
  `batch_keys`: the arrays of the artifact that go into a training batch.
  """
  kind: str
  k: int
  length: int
  batch_keys: tuple[str, ...]
  stride: int = 0
  query_len: int = 0


@dataclasses.dataclass(frozen=True)
class EvalVariant:
  """One row of `eval.py`'s table for a family: a label and what to leave out of the batch
  (e.g. RETRO "retrieval off" drops `neighbours`)."""
  label: str
  drop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
  """The small interface of a model family (see the module docstring)."""
  name: str
  model: Callable[[Any], nn.Module]
  loss: Callable[[Any], LossFn]
  inputs: Callable[[Any, Batch], tuple]
  retrieval: Callable[[Any], RetrievalSpec | None]
  example_batch: Callable[[Any, int, int, Any], dict[str, Any]]
  eval_variants: tuple[EvalVariant, ...] = (EvalVariant("retrieval on"),)
  sampler: Callable[..., Any] | None = None
  decoder: Callable[[Any], nn.Module] | None = None
  knn_key: bool = False  # the model returns a kNN-LM key (apply(..., return_key=True))
  knn_default: bool = False  # evaluate and sample as a kNN-LM unless told otherwise
  refresh: Callable[[Any], int] | None = None  # steps between index refreshes (0 = frozen)


def names() -> list[str]:
  """Every model family in this package (the valid values of `model.name`)."""
  import models

  return sorted(m.name for m in pkgutil.iter_modules(models.__path__)
                if m.name not in _NOT_FAMILIES)


def get(name: str) -> Family:
  """The family `models/<name>.py` exports; UserError for an unknown name."""
  if name not in names():
    raise UserError(f"model.name={name!r} is unknown; use one of {', '.join(names())}")
  return importlib.import_module(f"models.{name}").FAMILY
