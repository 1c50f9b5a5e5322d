"""IVF indexes whose inverted lists live on disk: `retrieval.index=ondisk:<IVF factory>`.

    build_ondisk(vectors_NxD, "IVF65536,PQ48", "ip", directory)   # pipeline stages
    index = load_ondisk(directory, nprobe=16)                     # lists memory-mapped

For datastores whose IVF codes outgrow RAM (`retrieval.memory_budget_gb`): the coarse
quantizer (and PQ) is trained on a sample in this process; each shard of VECTORS_PER_SHARD
vectors is added to its own copy of the trained, empty index by a pipeline stage (ids are
row numbers; shards resumable like every sharded stage); FAISS's `merge_ondisk` then merges
the shards' inverted lists into `lists.ivfdata` shard by shard (memory-mapped, never all
in RAM). A search holds the quantizer in RAM and reads the lists it probes from disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from common.errors import UserError
from retrieval import index as index_lib
from retrieval import shards

PREFIX = "ondisk:"
VECTORS_PER_SHARD = 1 << 18
INDEX_FILE, LISTS_FILE = "index.faiss", "lists.ivfdata"


def build_ondisk(vectors_NxD: np.ndarray, spec: str, metric: str, directory: str | os.PathLike,
                 train_size: int | None = None, seed: int = 0) -> None:
  """Writes `directory/index.faiss` (the trained index, lists on disk) and its lists."""
  directory = Path(directory)
  n, d = vectors_NxD.shape
  spec = spec.removeprefix(PREFIX)
  trained = index_lib.make_index(n, d, metric, spec, train_size=train_size)
  if faiss.try_extract_index_ivf(trained) is None:
    raise UserError(f"retrieval.index={PREFIX}{spec}: on-disk lists need an IVF index, e.g. "
                    f"{PREFIX}{index_lib.ivfpq_factory(n, d, float('inf'))}")
  index_lib.train_index(trained, vectors_NxD, index_lib.train_count(spec, n, train_size), seed)
  empty = faiss.serialize_index(trained)

  def compute(s0: int, s1: int) -> dict[str, np.ndarray]:
    part = faiss.deserialize_index(empty)
    part.add_with_ids(np.ascontiguousarray(vectors_NxD[s0:s1], np.float32),
                      np.arange(s0, s1, dtype=np.int64))
    blob = faiss.serialize_index(part)
    return {"shard_index": blob, "shard_bytes": np.array([len(blob)], np.int64)}

  arrays = shards.sharded_rows(directory / "shards", n, VECTORS_PER_SHARD, compute,
                               desc="fill index shards", unit="vector",
                               job={"spec": spec, "metric": metric, "d": d, "seed": seed})
  names, start = [], 0
  for i, size in enumerate(np.asarray(arrays["shard_bytes"])):  # one file a shard to merge
    names.append(str(directory / f".shard{i:05d}.index"))
    arrays["shard_index"][start:start + size].tofile(names[-1])
    start += int(size)
  del arrays
  merge_ondisk(trained, names, str(directory / LISTS_FILE))
  index_lib.save_index(trained, directory / INDEX_FILE)
  for name in names:
    os.unlink(name)
  for leftover in (directory / "shards").iterdir():
    leftover.unlink()
  (directory / "shards").rmdir()


def load_ondisk(directory: str | os.PathLike, nprobe: int = index_lib.NPROBE,
                ef_search: int = index_lib.EF_SEARCH) -> faiss.Index:
  """The index of `build_ondisk`, its lists read from the same directory (wherever it
  was moved) and memory-mapped."""
  path = Path(directory) / INDEX_FILE
  if not path.is_file():
    raise UserError(f"no FAISS index at {path}; build it first (it is built with the "
                    f"neighbours)")
  index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
  index_lib.set_search_params(index, nprobe, ef_search)
  return index
