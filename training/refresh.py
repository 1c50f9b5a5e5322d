"""REALM's stale index, refreshed: the datastore and the queries re-embedded with the
current encoders and searched again (`retrieval.refresh_every`; the family decides)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

import models
from common.errors import UserError
from retrieval import build, candidates, datastore


def check_processes(config: ml_collections.ConfigDict) -> None:
  """UserError if this config refreshes the index in a multi-process job (one process
  re-embeds the whole datastore; the refresh is not split over processes)."""
  if refresh_every(config) and jax.process_count() > 1:
    raise UserError(f"REALM's index refresh (retrieval.refresh_every={config.retrieval.refresh_every}"
                    f" with a trainable document encoder) runs in one process, not "
                    f"{jax.process_count()}; train on one host or set "
                    f"--config.retrieval.refresh_every=0")


def refresh_candidates(config: ml_collections.ConfigDict, artifacts: build.Artifacts,
                        params: Any) -> build.Artifacts:
  """REALM: re-embed the datastore and the queries with the current encoders; new candidates.

  One process only (`check_processes`).
  """
  check_processes(config)
  model = models.get_model(config.model)
  cls = type(model)
  docs = jax.jit(lambda p, t, e: model.apply({"params": p}, t, e, method=cls.embed_documents))
  queries = jax.jit(lambda p, t, e: model.apply({"params": p}, t, e, method=cls.embed_query))
  r = config.retrieval
  splits = {name: artifacts.prepared.split(name) for name in artifacts.retrieved.arrays}
  stale_NxE = datastore.datastore_embeddings(config, artifacts.prepared, artifacts.datastore)
  stale_queries = {name: artifacts.retrieved.arrays[name][candidates.QUERIES] for name in splits}
  retrieved = candidates.refresh(
      lambda t, e: np.asarray(docs(params, t, e)), lambda t, e: np.asarray(queries(params, t, e)),
      artifacts.datastore.split, stale_NxE, splits, stale_queries, config.model.num_neighbours,
      overfetch=r.overfetch, metric=r.metric, index_spec=r.index,
      memory_budget_gb=r.memory_budget_gb, nprobe=r.nprobe, ef_search=r.ef_search,
      batch_keys=artifacts.retrieved.batch_keys)
  return dataclasses.replace(artifacts, retrieved=retrieved)


def refresh_every(config: ml_collections.ConfigDict) -> int:
  """Steps between refreshes of the stale index (the family decides; 0 = frozen)."""
  return models.get_family(config.model).refresh_every(config)
