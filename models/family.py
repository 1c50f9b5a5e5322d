"""The interface every model family exports, and the lookup by `config.model.name`.

A family is one module `models/<name>.py` with a module-level `FAMILY = Family(...)`:

    family = models.get_family(config.model)                # importlib: models.<name>.FAMILY
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
import jax.numpy as jnp
import numpy as np

from common.errors import UserError

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]

# Modules of this package that are building blocks, not families.
_NOT_FAMILIES = {"attention", "family", "layers", "ops"}


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
  """One row of `eval.py`'s table for a family: a label, what to leave out of the batch
  (e.g. RETRO "retrieval off" drops `neighbours`) and the metrics' key ("" = `eval/*`,
  else `eval/<key>/*`)."""
  label: str
  drop: tuple[str, ...] = ()
  key: str = ""


def token_batch(spec: Any, batch_size: int, seq_len: int, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
  """Random `inputs`, `targets`, `weights` of a language-model batch (tokens 1..V-1)."""
  tokens = rng.integers(1, spec.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((batch_size, seq_len), np.float32)}


def tokens_only(spec: Any, batch_size: int, length: int) -> tuple:
  """The arguments that size a decoding cache of a plain decoder: tokens [B, length]."""
  return (jnp.zeros((batch_size, length), jnp.int32),)


@dataclasses.dataclass(frozen=True)
class Family:
  """The small interface of a model family (see the module docstring).

  model(spec) -> the Flax module; loss(spec) -> LossFn; inputs(spec, batch) -> the
  positional arguments of `model.apply` after the variables; retrieval(spec) -> what it
  reads from the datastore (None: nothing); example_batch(spec, B, L, rng) -> a random
  batch with every key the loss reads (benchmarks, tests); eval_variants: the rows
  `eval.py` reports; sample(context) -> citations: the decoding loop behind
  `generate.py` (see `inference.Context`); decoder(spec) -> the module that decodes with a
  cache (default: the model) and decode_init_args(spec, B, length) -> its init inputs;
  validate(config) -> None or UserError: checks the family's fields of a full config.
  """
  name: str
  model: Callable[[Any], nn.Module]
  loss: Callable[[Any], LossFn]
  inputs: Callable[[Any, Batch], tuple]
  sample: Callable[[Any], Any]
  retrieval: Callable[[Any], RetrievalSpec | None] = lambda spec: None
  example_batch: Callable[[Any, int, int, np.random.Generator], dict[str, Any]] = token_batch
  eval_variants: tuple[EvalVariant, ...] = (EvalVariant(""),)
  decoder: Callable[[Any], nn.Module] | None = None
  decode_init_args: Callable[[Any, int, int], tuple] = tokens_only
  validate: Callable[[Any], None] = lambda config: None
  knn_key: bool = False  # apply(..., return_key=True) also returns the kNN-LM key
  knn_default: bool = False  # evaluate and sample as a kNN-LM unless told otherwise
  refresh_every: Callable[[Any], int] = lambda config: 0  # steps between index refreshes


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
