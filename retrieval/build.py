"""Builds every retrieval artifact a config needs.

    python -m retrieval.build --config retro_small [--config.retrieval.datastore=shakespeare_folio]

RETRO (`model.name == "retro"`): neighbours of every training and validation chunk; REALM:
candidates of every sequence; kNN-LM: its datastore holds a trained LM's keys, so it is
built from a checkpoint by eval.py/train.py (`neighbours.knn_datastore`) and this only
prepares the data. train.py calls `build_all`, which reuses whatever is already cached.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import ml_collections
import numpy as np

from common import cli
from common.errors import cli_main
from data import dataset
from retrieval import neighbours

KINDS = {"retro": neighbours.RETRO, "realm": neighbours.REALM}


@dataclasses.dataclass(frozen=True)
class Artifacts:
  """The prepared data plus the retrieval arrays of a config, and the hashes of both."""

  prepared: dataset.Prepared
  datastore: neighbours.Datastore | None  # None: the model retrieves nothing precomputed
  retrieved: neighbours.Retrieved | None  # RETRO neighbours or REALM candidates
  hashes: dict[str, str]

  def batch(self, split: str, index_B: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """A full batch of sequences `index_B` (-1: padding): tokens plus retrieval arrays."""
    batch = self.prepared.split(split).batch(index_B)
    if self.retrieved is not None:
      batch.update(self.retrieved.batch(split, batch["index"]))
    return batch


def build_all(config: ml_collections.ConfigDict) -> Artifacts:
  """Prepares the data and builds (or loads from the cache) the config's retrieval arrays."""
  prepared = dataset.prepare(config)
  kind = KINDS.get(config.model.name)
  if kind is None:
    return Artifacts(prepared=prepared, datastore=None, retrieved=None,
                     hashes=dict(prepared.hashes))
  store = neighbours.load_datastore(config, prepared)
  retrieved = neighbours.build_retrieval(config, prepared, kind, store)
  hashes = {**prepared.hashes, **retrieved.manifest["inputs"], kind: retrieved.directory.name}
  return Artifacts(prepared=prepared, datastore=store, retrieved=retrieved, hashes=hashes)


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
  p = cli.parser("Build the retrieval artifacts (RETRO neighbours, REALM candidates) of a config.")
  _, config = cli.parse(p, argv)
  start = time.perf_counter()
  artifacts = build_all(config)
  print(summary(artifacts))
  if config.model.name == "knnlm":
    print("model.name=knnlm: the kNN-LM datastore holds a trained LM's keys; eval.py builds it "
          "from a checkpoint (train first: python train.py --config " f"{config.name})")
  elif artifacts.retrieved is None:
    print(f"model.name={config.model.name}: no retrieval artifacts needed")
  print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
