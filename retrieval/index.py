"""FAISS index factory: Flat, HNSW or IVF-PQ chosen by datastore size and memory budget.

    idx = build_index(vectors_NxD, metric="ip")             # spec="auto" -> choose_factory
    dists_QxK, ids_QxK = search(idx, queries_QxD, k=10)
    save_index(idx, path); idx = load_index(path)          # nprobe=NPROBE, ef_search=EF_SEARCH

Distances: with metric "ip" the returned "distance" is the inner product (larger is
closer); with "l2" it is the squared L2 distance (smaller is closer). Rows are sorted best
first. A result FAISS could not fill (fewer than k reachable vectors) has id -1 and the
worst possible distance (-3.4e38 for ip, +3.4e38 for l2).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from common.errors import UserError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FLAT_MAX = 100_000  # exact search up to here: N queries against N vectors stays cheap
HNSW_MAX = 300_000  # beyond this HNSW construction gets too slow on a few cores
HNSW_M = 32
# Search defaults, the one place they are set (configs/base.py and every loader use these):
NPROBE = 16  # IVF lists visited per query
EF_SEARCH = 64  # HNSW candidate list size per query
REFINE_K_FACTOR = 8  # refined IVF-PQ: k * this many PQ candidates are re-ranked exactly
_HNSW_BYTES_PER_LINK = 4 * 2 * 1.25  # level-0 links (2M ids of 4 bytes) + upper levels
_IVF_ID_BYTES = 8  # each IVF entry stores its int64 id beside the PQ code
_ADD_BATCH = 65536


def ivf_nlist(n: int) -> int:
  """The power of two nearest 4*sqrt(n), with at least 39 training vectors per list."""
  nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
  while nlist > 1 and nlist * 39 > n:
    nlist //= 2
  return nlist


def _pq_ms(d: int, top: int = 64) -> list[int]:
  """PQ sub-quantizer counts m <= top that divide d, largest (most accurate) first."""
  return [m for m in range(max(1, min(d, top)), 0, -1) if d % m == 0]


def choose_factory(n: int, d: int, memory_budget_gb: float) -> str:
  """A FAISS factory string for n vectors of width d that fits memory_budget_gb.

  Flat (exact) up to FLAT_MAX vectors, HNSW32 up to HNSW_MAX, else refined IVF-PQ
  (`refined_ivfpq_factory`: 4-bit fast-scan PQ candidates re-ranked exactly against the
  stored vectors), else plain IVF<nlist>,PQ<m> with nlist ~ 4 sqrt(n) and 8-dimensional PQ
  sub-vectors; each only if it fits the budget (the next, smaller one is tried when it
  does not). docs/index.md has each choice's measured recall, speed and bytes.
  """
  budget = memory_budget_gb * 2**30
  if n <= FLAT_MAX and n * d * 4 <= budget:
    return "Flat"
  if n <= HNSW_MAX and n * (d * 4 + HNSW_M * _HNSW_BYTES_PER_LINK) <= budget:
    return f"HNSW{HNSW_M}"
  spec = refined_ivfpq_factory(n, d, memory_budget_gb) or ivfpq_factory(n, d, memory_budget_gb)
  if spec is None:
    raise UserError(f"{n} vectors of width {d} do not fit retrieval.memory_budget_gb="
                    f"{memory_budget_gb} even as IVF-PQ codes; raise the budget or keep the lists "
                    f"on disk: --config.retrieval.index=ondisk:{ivfpq_factory(n, d, float('inf'))}")
  return spec


def ivfpq_factory(n: int, d: int, memory_budget_gb: float) -> str | None:
  """IVF<nlist>,PQ<m>: the most accurate PQ (8+ dims per sub-vector) within the budget."""
  nlist = ivf_nlist(n)
  for m in _pq_ms(d, top=d // 8):
    if n * (m + _IVF_ID_BYTES) + nlist * d * 4 <= memory_budget_gb * 2**30:
      return f"IVF{nlist},PQ{m}"
  return None


def refined_ivfpq_factory(n: int, d: int, memory_budget_gb: float) -> str | None:
  """IVF<nlist>,PQ<m>x4fs,RFlat: fast-scan PQ (4-bit codes, 4 dims per sub-quantizer)
  proposes k * REFINE_K_FACTOR candidates, re-ranked by exact distances to the stored
  float32 vectors; nlist ~ sqrt(n) (fast-scan lists are cheap to scan, fewer centroids
  train faster). None if the stored vectors do not fit the budget."""
  if d % 4:
    return None
  nlist = max(1, ivf_nlist(n) // 4)
  m = d // 4
  if n * (d * 4 + m / 2 + _IVF_ID_BYTES) + nlist * d * 4 > memory_budget_gb * 2**30:
    return None
  return f"IVF{nlist},PQ{m}x4fs,RFlat"


def _check_spec(spec: str, d: int, n_train: int) -> None:
  """UserErrors for the mistakes FAISS would report as a C++ assertion."""
  for m, nbits in re.findall(r"PQ(\d+)(?:x(\d+))?", spec):
    if d % int(m):
      raise UserError(f"index {spec!r}: vector width {d} is not divisible by PQ m={m}; "
                      f"use one of PQ{', PQ'.join(map(str, _pq_ms(d)[:4]))}")
    if n_train < 2 ** int(nbits or 8):
      raise UserError(f"index {spec!r}: {n_train} training vectors are fewer than the "
                      f"{2 ** int(nbits or 8)} PQ centroids; use Flat or HNSW32")
  for nlist in re.findall(r"IVF(\d+)", spec):
    if int(nlist) > n_train:
      raise UserError(f"index {spec!r}: {n_train} training vectors are fewer than the "
                      f"{nlist} IVF lists; use IVF{ivf_nlist(n_train)} or Flat")


def train_count(spec: str, n: int, train_size: int | None = None) -> int:
  """Vectors sampled for training: train_size, default max(50k, 64 * nlist); at most n."""
  if train_size is None:
    train_size = max([50_000] + [64 * int(x) for x in re.findall(r"IVF(\d+)", spec)])
  return min(n, train_size)


def make_index(n: int, d: int, metric: str = "ip", spec: str = "auto",
               memory_budget_gb: float = 4.0, train_size: int | None = None) -> faiss.Index:
  """An empty FAISS index for n vectors of width d (spec "auto": choose_factory)."""
  if metric not in METRICS:
    raise UserError(f"metric {metric!r} is unknown; set retrieval.metric to 'ip' or 'l2'")
  if spec == "auto":
    spec = choose_factory(n, d, memory_budget_gb)
  _check_spec(spec, d, train_count(spec, n, train_size))
  try:
    index = faiss.index_factory(d, spec, METRICS[metric])
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1][:160]
    raise UserError(f"invalid FAISS index spec {spec!r} ({reason}); use 'auto' or a factory "
                    f"string such as Flat, HNSW32, IVF1024,PQ48") from None
  for part in (index, faiss.try_extract_index_ivf(index)):
    part = faiss.downcast_index(part) if part is not None else None
    if hasattr(part, "do_polysemous_training"):  # PQ indexes: slow, and unused here
      part.do_polysemous_training = False
  return index


def train_index(index: faiss.Index, vectors: np.ndarray, n_train: int, seed: int = 0) -> None:
  """Trains IVF / PQ parts on n_train vectors sampled with `seed` (no-op if trained)."""
  if index.is_trained:
    return
  sample = np.sort(np.random.default_rng(seed).choice(len(vectors), size=n_train, replace=False))
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is not None:
    ivf.cp.seed = seed
  index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))


def add_vectors(index: faiss.Index, vectors: np.ndarray) -> None:
  """index.add in batches of 64k (float32 copies of memmap slices), with a progress bar."""
  n = len(vectors)
  for s in tqdm(range(0, n, _ADD_BATCH), desc="index add", unit="batch",
                disable=n <= 4 * _ADD_BATCH):
    index.add(np.ascontiguousarray(vectors[s:s + _ADD_BATCH], dtype=np.float32))


def build_index(vectors: np.ndarray, metric: str = "ip", spec: str = "auto",
                memory_budget_gb: float = 4.0, nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
                train_size: int | None = None, seed: int = 0) -> faiss.Index:
  """A trained, filled FAISS index over `vectors` [N, D] (any float array or memmap).

  Args:
    metric: "ip" (inner product) or "l2" (squared Euclidean).
    spec: "auto" (choose_factory) or a FAISS factory string ("Flat", "HNSW32", "IVF1024,PQ48").
    train_size: vectors sampled to train IVF/PQ; default max(50k, 64 * nlist), at most N.
    seed: picks the training sample and seeds the IVF k-means.
  """
  if vectors.ndim != 2 or len(vectors) == 0:
    raise UserError(f"index vectors must be a non-empty [N, D] array, got shape "
                    f"{vectors.shape}; embed the datastore first")
  n, d = vectors.shape
  if spec == "auto":
    spec = choose_factory(n, d, memory_budget_gb)
  index = make_index(n, d, metric, spec, memory_budget_gb, train_size)
  train_index(index, vectors, train_count(spec, n, train_size), seed)
  add_vectors(index, vectors)
  set_search_params(index, nprobe, ef_search)
  return index


def sample_recall(index: faiss.Index, vectors: np.ndarray, metric: str, k: int,
                  queries: int = 1000, seed: int = 0) -> float:
  """recall@k of `index` over `vectors` (what it holds, any float array or memmap): for
  `queries` of the vectors themselves, drawn with `seed`, the share of their exact k nearest
  (a blockwise exact search) that the index returns. 1.0 for an exact index (up to ties
  between equally distant vectors)."""
  n = len(vectors)
  q_QxD = np.ascontiguousarray(vectors[np.sort(np.random.default_rng(seed).choice(
      n, size=min(queries, n), replace=False))], dtype=np.float32)
  k = min(k, n)
  heap = faiss.ResultHeap(len(q_QxD), k, keep_max=metric == "ip")
  for s in range(0, n, _ADD_BATCH):
    block = np.ascontiguousarray(vectors[s:s + _ADD_BATCH], dtype=np.float32)
    dists, ids = faiss.knn(q_QxD, block, k, METRICS[metric])
    heap.add_result(dists, np.where(ids >= 0, ids + s, -1))
  heap.finalize()
  _, got_QxK = index.search(q_QxD, k)
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got_QxK, heap.I)]))


def refill(trained: faiss.Index, vectors: np.ndarray, nprobe: int = NPROBE,
           ef_search: int = EF_SEARCH, start: int = 0) -> faiss.Index:
  """A copy of `trained` holding `vectors`: its trained parts (IVF centroids, PQ codebooks)
  are kept, not retrained. start=0: emptied, then all are added (an HNSW graph is rebuilt);
  start=n: it holds vectors[:n] already and only the rest are added."""
  index = faiss.clone_index(trained)
  if start == 0:
    index.reset()
  elif index.ntotal != start:
    raise ValueError(f"the index holds {index.ntotal} vectors, not the first {start}")
  add_vectors(index, vectors[start:])
  set_search_params(index, nprobe, ef_search)
  return index


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int,
                      refine_k_factor: int = REFINE_K_FACTOR) -> None:
  """nprobe for IVF indexes, efSearch for HNSW (the index or an IVF's coarse quantizer),
  k_factor for a refined index (`...,RFlat`)."""
  refine = faiss.downcast_index(index)
  if isinstance(refine, faiss.IndexRefine):
    refine.k_factor = refine_k_factor
  params = faiss.ParameterSpace()
  if faiss.try_extract_index_ivf(index) is not None:
    params.set_index_parameter(index, "nprobe", nprobe)
  try:
    params.set_index_parameter(index, "efSearch", ef_search)
  except RuntimeError:  # FAISS's answer for an index without an HNSW graph inside
    pass


def search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 4096
           ) -> tuple[np.ndarray, np.ndarray]:
  """(dists float32 [N, k], ids int64 [N, k]), best first; see the module docstring."""
  if queries.ndim != 2 or queries.shape[1] != index.d:
    raise UserError(f"queries of shape {queries.shape} do not match the index width "
                    f"{index.d}; embed queries with the datastore's embedder")
  if k < 1:
    raise UserError(f"search k={k} must be >= 1")
  n = len(queries)
  dists_NxK = np.empty((n, k), np.float32)
  ids_NxK = np.empty((n, k), np.int64)
  for s in tqdm(range(0, n, batch_size), desc="search", unit="batch",
                disable=n <= 4 * batch_size):
    q = np.ascontiguousarray(queries[s:s + batch_size], dtype=np.float32)
    dists_NxK[s:s + len(q)], ids_NxK[s:s + len(q)] = index.search(q, k)
  return dists_NxK, ids_NxK


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
  """faiss.write_index to a temporary name, then an atomic rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  faiss.write_index(index, str(tmp))
  os.replace(tmp, path)


def load_index(path: str | os.PathLike, nprobe: int = NPROBE, ef_search: int = EF_SEARCH
               ) -> faiss.Index:
  """faiss.read_index, with the search parameters set."""
  if not Path(path).is_file():
    raise UserError(f"no FAISS index at {path}; build it first (it is built with the "
                    f"neighbours)")
  index = faiss.read_index(str(path))
  set_search_params(index, nprobe, ef_search)
  return index
