"""Builds every retrieval artifact a config needs: what the model family requests.

    python -m retrieval.build --config retro_small [--workers 2] [--config.retrieval.datastore=...]
    python -m retrieval.build --config retro_172m -- --runner=DataflowRunner --project=P ...

    artifacts = build_all(config, runner=pipeline.Runner(workers=2))  # the family's request

    retrieved = build_retrieval(config, prepared, request)   # an explicit RetrievalSpec

The model family (`models.family.get(config.model.name).retrieval(spec)`) says what it
reads from the datastore: a `models.family.RetrievalSpec` or None. Its `kind` picks the
builder: "neighbours" (neighbours.py: RETRO, In-Context RALM) or "candidates"
(candidates.py: REALM). A builder embeds the datastore chunks (datastore.py; reused as the
queries of the split it was made from) and each split's queries, builds the index, then
searches and materialises per split into `cache_root/<artifact kind>/<fingerprint>/`
(resumable: shards.py). Every sharded stage (tokenising, embedding, searching) runs as an
Apache Beam pipeline (pipeline.py): locally with N worker processes, or on the Beam runner
that the options after `--` name; one worker is the same pipeline in this process. A
kNN-LM datastore holds a trained LM's keys, so eval.py/train.py build it from a checkpoint
(knn_datastore.py); this only prepares the data for it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import ml_collections
import numpy as np

from common import artifacts as artifacts_lib
from common import cli
from common.errors import UserError, cli_main
from data import dataset
from models import family as family_lib
from models import layers
from retrieval import candidates, core, datastore, neighbours, patch, pipeline


@dataclasses.dataclass(frozen=True)
class Builder:
  """One retrieval job: its artifact kind, its ids array, and its steps (see the modules)."""
  artifact: str  # cache folder and manifest kind
  ids: str  # the array whose -1 entries count as unfilled
  check: Callable[..., None]  # (config, request, embedder): UserError on a bad request
  queries: Callable[..., np.ndarray]  # (config, prepared, split, embedder, request)
  search: Callable[..., dict[str, np.ndarray]]  # (config, request, dir, split, queries, ...)
  rows: Callable[..., Callable[[np.ndarray], dict[str, np.ndarray]]]  # the search of some rows
  dists: str  # the array of scores (best first; a missing item scores worst)
  per_query: tuple[str, ...] = ()  # arrays without a K axis (`core.Retrieved.per_query`)


BUILDERS = {
    "neighbours": Builder(neighbours.ARTIFACT, neighbours.IDS, neighbours.check,
                          neighbours.queries, neighbours.search, neighbours.rows,
                          "neighbour_dists"),
    "candidates": Builder(candidates.ARTIFACT, candidates.IDS, candidates.check,
                          candidates.queries, candidates.search, candidates.rows,
                          "candidate_scores", (candidates.QUERIES,)),
}

Search = Callable[..., dict[str, np.ndarray]]  # a Builder.search


@dataclasses.dataclass(frozen=True)
class Artifacts:
  """The prepared data plus the retrieval arrays of a config, and the hashes of both."""

  prepared: dataset.Prepared
  datastore: datastore.Datastore | None  # None: the model retrieves nothing precomputed
  retrieved: core.Retrieved | None  # neighbours or candidates
  hashes: dict[str, str]

  def batch(self, split: str, index_B: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """A full batch of sequences `index_B` (-1: padding): tokens plus retrieval arrays."""
    batch = self.prepared.split(split).batch(index_B)
    if self.retrieved is not None:
      batch.update(self.retrieved.batch(split, batch["index"]))
    return batch


def retrieval_request(config: ml_collections.ConfigDict) -> family_lib.RetrievalSpec | None:
  """The model family's `RetrievalSpec` for this config, or None (no retrieval)."""
  spec = layers.Spec.from_config(config.model)
  return family_lib.get(config.model.name).retrieval(spec)


def build_all(config: ml_collections.ConfigDict, splits: Sequence[str] | None = None,
              runner: pipeline.Runner | None = None) -> Artifacts:
  """Prepares the data and builds (or loads from the cache) the family's retrieval arrays
  for `splits` (default: every split the dataset has; evaluating a model as another
  family builds one). Every sharded stage runs as a Beam pipeline on `runner` (default:
  the active one, else one worker in this process)."""
  with (runner or pipeline.current()).active():
    return _build_all(config, splits)


def _build_all(config: ml_collections.ConfigDict, splits: Sequence[str] | None) -> Artifacts:
  prepared = dataset.prepare(config)
  request = retrieval_request(config)
  if request is None:
    return Artifacts(prepared=prepared, datastore=None, retrieved=None,
                     hashes=dict(prepared.hashes))
  store = datastore.load_datastore(config, prepared)
  retrieved = build_retrieval(config, prepared, request, store, splits)
  hashes = {**prepared.hashes, **retrieved.manifest["inputs"],
            retrieved.kind: retrieved.directory.name}
  return Artifacts(prepared=prepared, datastore=store, retrieved=retrieved, hashes=hashes)


def retrieval_inputs(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                     store: datastore.Datastore, embedder_hash: str, index_hash: str,
                     request: family_lib.RetrievalSpec,
                     splits: Sequence[str]) -> dict[str, str]:
  """Every input hash a neighbours/candidates artifact depends on (its manifest's `inputs`)."""
  r = config.retrieval
  return {**prepared.hashes, "datastore": store.hash, "embedder": embedder_hash,
          "index": index_hash,
          "params": artifacts_lib.fingerprint({
              "kind": request.kind, "k": request.k, "length": request.length,
              "stride": request.stride, "query_len": request.query_len,
              "overfetch": r.overfetch, "seq_len": config.data.seq_len,
              "chunk_size": config.model.chunk_size, "splits": sorted(splits),
              **({"align": r.align_neighbours} if request.kind == "neighbours" else {})})}


def rebuild_hint(config: ml_collections.ConfigDict, directory: Path) -> str:
  return (f"rebuild with `python -m retrieval.build --config {config.name}` "
          f"(or delete {directory})")


def _artifact_dir(config: ml_collections.ConfigDict, kind: str, inputs: dict[str, str]) -> Path:
  return artifacts_lib.cache_root(config.data.cache_dir) / kind / artifacts_lib.fingerprint(inputs)


def build_retrieval(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                    request: family_lib.RetrievalSpec,
                    store: datastore.Datastore | None = None,
                    splits: Sequence[str] | None = None, search: Search | None = None,
                    **manifest: object) -> core.Retrieved:
  """The arrays `request` (a `models.family.RetrievalSpec`) asks for, for `splits`, cached.

  Embeds the datastore chunks and every split's queries, builds the index, then searches
  and materialises per split with the builder of `request.kind` (or `search`, with the
  builder's arguments; `manifest`: what else its manifest records). A datastore version
  edited from another (`retrieval.edit`) whose arrays are cached copies them and searches
  again only the rows the edit can change (`patch.patched_search`).
  """
  if request.kind not in BUILDERS:
    raise ValueError(f"request kind must be one of {', '.join(BUILDERS)}, got {request.kind!r}")
  builder = BUILDERS[request.kind]
  splits = prepared.names if splits is None else tuple(splits)
  r = config.retrieval
  if r.overfetch < 1 or request.k < 1:
    raise UserError(f"retrieval.overfetch={r.overfetch} and the model's k={request.k} (its "
                    f"neighbours per query) must be >= 1; set them to e.g. 4 and 2")
  store = datastore.load_datastore(config, prepared) if store is None else store
  timings: dict[str, float] = {}
  embedder = datastore.load_embedder(config)
  builder.check(config, request, embedder)
  t0 = time.perf_counter()
  parent = datastore.parent_of(config, prepared, store)
  store_NxE, emb_hash = datastore.store_embeddings(config, prepared, store, embedder, parent)
  queries = {name: builder.queries(config, prepared, prepared.split(name), embedder, request)
             for name in splits}
  t1 = time.perf_counter()
  index, index_hash = datastore.store_index(config, prepared, embedder, store_NxE, emb_hash,
                                            parent)
  timings.update(embed_s=t1 - t0, index_s=time.perf_counter() - t1)
  inputs = retrieval_inputs(config, prepared, store, embedder.hash, index_hash, request, splits)
  kind = builder.artifact
  final = _artifact_dir(config, kind, inputs)
  if artifacts_lib.read_manifest(final) is None:
    print(f"building {kind} {final}", flush=True)
    if search is None and parent is not None:  # an edited version: patch its parent's rows
      parent_index_hash = datastore.store_vectors(config, prepared, parent.store, embedder)[3]
      parent_dir = _artifact_dir(config, kind, retrieval_inputs(
          config, prepared, parent.store, embedder.hash, parent_index_hash, request, splits))
      if artifacts_lib.read_manifest(parent_dir) is not None:
        search = patch.patched_search(builder, parent_dir, parent, store, r.metric)
        manifest = {**manifest, "patched_from": parent_dir.name}
    with artifacts_lib.building(final) as work:
      shapes, unfilled = {}, {}
      for name in splits:
        arrays = (search or builder.search)(config, request, work / name, prepared.split(name),
                                            queries[name], store, store_NxE, index, timings)
        shapes[name] = {key: list(a.shape) for key, a in arrays.items()}
        unfilled[name] = float(np.mean(np.asarray(arrays[builder.ids]) < 0))
      artifacts_lib.write_manifest(
          work, kind, inputs, datastore=store.spec or "train split",
          datastore_chunks=int(store.split.num_chunks), shapes=shapes,
          unfilled_fraction=unfilled, metric=r.metric, request=dataclasses.asdict(request),
          timings={key: round(v, 3) for key, v in timings.items()}, **manifest)
  else:
    print(f"reusing cached {kind} {final}", flush=True)
  return core.load_retrieved(final, inputs, rebuild_hint(config, final), request.batch_keys,
                             artifacts_lib.rebuild_command(config.name), builder.per_query)


def summary(artifacts: Artifacts) -> str:
  """Human-readable lines: where the artifacts are, their shapes, fill rate and timings."""
  p = artifacts.prepared
  lines = [f"data: {p.directory} (train {p.train.num_sequences} sequences, "
           f"validation {p.validation.num_sequences})"]
  r = artifacts.retrieved
  if r is None:
    return "\n".join(lines)
  m = r.manifest
  lines.append(f"{r.kind}: {r.directory} (datastore: {m['datastore']}, "
               f"{m['datastore_chunks']} chunks)")
  for split, arrays in r.arrays.items():
    shapes = ", ".join(f"{name} {list(a.shape)}" for name, a in arrays.items())
    lines.append(f"  {split}: {shapes}; unfilled {m['unfilled_fraction'][split]:.2%}")
  if m.get("timings"):
    lines.append("  build seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings"].items()))
  return "\n".join(lines)


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  beam_options = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = cli.parser("Build the retrieval artifacts (neighbours, candidates) of a config; Beam "
                 "pipeline options (e.g. --runner=DataflowRunner --project=P) go after --.")
  p.add_argument("--workers", type=int, default=0,
                 help="local worker processes (default 0: one per core)")
  args, config = cli.parse(p, argv)
  runner = pipeline.Runner(args.workers, beam_options)
  print(f"building on {runner}", flush=True)
  start = time.perf_counter()
  artifacts = build_all(config, runner=runner)
  print(summary(artifacts))
  if runner.stage_seconds:
    print("pipeline seconds: " + ", ".join(f"{stage} {s:.1f}"
                                            for stage, s in runner.stage_seconds.items()))
  if artifacts.retrieved is None:
    if family_lib.get(config.model.name).knn_key:
      print(f"model.name={config.model.name}: the kNN-LM datastore holds a trained LM's keys; "
            f"eval.py builds it from a checkpoint (train first: python train.py --config "
            f"{config.name})")
    else:
      print(f"model.name={config.model.name}: no retrieval artifacts needed")
  print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
