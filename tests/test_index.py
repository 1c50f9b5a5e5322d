"""FAISS index factory: exactness of Flat, recall of IVF-PQ and HNSW, persistence, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from common.errors import UserError
from retrieval import index as rindex


def clustered(n: int, d: int, seed: int, clusters: int = 64, rank: int = 4) -> np.ndarray:
  """Seeded clusters, each spread along its own low-rank subspace (like real embeddings)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, d))
  bases = rng.normal(size=(clusters, rank, d)) / np.sqrt(rank)
  c = rng.integers(0, clusters, n)
  x = (centers[c] + np.einsum("nr,nrd->nd", rng.normal(size=(n, rank)), bases[c])
       + 0.05 * rng.normal(size=(n, d)))
  return x.astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str):
  x64, q64 = x.astype(np.float64), q.astype(np.float64)
  if metric == "ip":
    scores = q64 @ x64.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  else:
    scores = (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None] - 2 * q64 @ x64.T
    ids = np.argsort(scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


def recall_at(ids: np.ndarray, true_ids: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, true_ids)]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy_top_k(metric):
  x = clustered(3000, 32, seed=1)
  q = clustered(40, 32, seed=2)
  index = rindex.build_index(x, metric=metric, spec="auto")
  assert isinstance(index, faiss.IndexFlat) and index.ntotal == 3000
  dists, ids = rindex.search(index, q, k=10, batch_size=16)
  want_dists, want_ids = brute_force(x, q, 10, metric)
  assert dists.dtype == np.float32 and ids.dtype == np.int64
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(dists, want_dists, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric,min_recall", [("l2", 0.9), ("ip", 0.85)])
def test_ivfpq_recall_against_exact(metric, min_recall):
  x = clustered(20_500, 64, seed=0)
  if metric == "ip":
    x /= np.linalg.norm(x, axis=1, keepdims=True)
  db, q = x[:20_000], x[20_000:]
  index = rindex.build_index(db, metric=metric, spec="IVF256,PQ64x4", nprobe=32,
                             train_size=10_000)
  assert faiss.extract_index_ivf(index).nprobe == 32
  _, ids = rindex.search(index, q, k=10)
  _, true_ids = brute_force(db, q, 10, metric)
  assert recall_at(ids, true_ids) >= min_recall


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sample_recall_equals_a_brute_force_count(metric, monkeypatch):
  """`sample_recall` (exact search in blocks: here 700 vectors, so ids carry block offsets)
  equals recall@k counted against numpy's exact top k for the same sampled queries: 1 for
  Flat, the same fraction for an IVF-PQ that misses some."""
  monkeypatch.setattr(rindex, "_ADD_BATCH", 700)
  x = clustered(3000, 32, seed=3)
  q = x[np.sort(np.random.default_rng(5).choice(3000, size=200, replace=False))]
  _, true_ids = brute_force(x, q, 8, metric)
  assert rindex.sample_recall(rindex.build_index(x, metric, "Flat"), x, metric, 8, 200, 5) == 1.0
  ivf = rindex.build_index(x, metric, "IVF32,PQ4", nprobe=1)
  want = recall_at(ivf.search(q, 8)[1], true_ids)
  assert 0.0 < want < 1.0
  assert rindex.sample_recall(ivf, x, metric, 8, 200, 5) == pytest.approx(want)


def test_refined_ivfpq_recall_and_exact_distances():
  """Fast-scan PQ candidates re-ranked against the stored vectors: high recall, and the
  distances returned are the exact inner products of the ids returned."""
  x = clustered(5_100, 64, seed=8)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  db, q = x[:5_000], x[5_000:]
  spec = rindex.refined_ivfpq_factory(len(db), 64, 4.0)
  assert spec == "IVF32,PQ16x4fs,RFlat"
  index = rindex.build_index(db, metric="ip", spec=spec, nprobe=8)
  assert faiss.downcast_index(index).k_factor == rindex.REFINE_K_FACTOR
  dists, ids = rindex.search(index, q, k=10)
  assert recall_at(ids, brute_force(db, q, 10, "ip")[1]) >= 0.95
  np.testing.assert_allclose(dists, np.einsum("qd,qkd->qk", q, db[ids]), rtol=1e-5, atol=1e-5)


def test_hnsw_recall_and_ef_search():
  x = clustered(5000, 32, seed=3)
  q = clustered(100, 32, seed=4)
  index = rindex.build_index(x, metric="ip", spec="HNSW32", ef_search=80)
  assert faiss.downcast_index(index).hnsw.efSearch == 80
  _, ids = rindex.search(index, q, k=10)
  assert recall_at(ids, brute_force(x, q, 10, "ip")[1]) >= 0.95


def test_missing_results_are_minus_one():
  x = clustered(5, 8, seed=5)
  dists, ids = rindex.search(rindex.build_index(x, metric="l2"), x[:2], k=8)
  assert (ids[:, 5:] == -1).all() and (ids[:, :5] >= 0).all()
  assert (dists[:, :5] < dists[:, 5:].min()).all()


@pytest.mark.parametrize("spec", ["IVF32,Flat", "HNSW16"])
def test_save_load_round_trip(tmp_path, spec):
  x = clustered(2000, 16, seed=6)
  index = rindex.build_index(x, metric="ip", spec=spec, nprobe=4, ef_search=32)
  path = tmp_path / "sub" / "index.faiss"
  rindex.save_index(index, path)
  assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]
  loaded = rindex.load_index(path, nprobe=4, ef_search=32)
  assert loaded.ntotal == 2000
  np.testing.assert_array_equal(rindex.search(loaded, x[:50], 5)[1],
                                rindex.search(index, x[:50], 5)[1])
  more = rindex.load_index(path, nprobe=32, ef_search=200)
  if spec.startswith("IVF"):
    assert faiss.extract_index_ivf(more).nprobe == 32
  else:
    assert faiss.downcast_index(more).hnsw.efSearch == 200


def test_choose_factory_by_size_and_budget():
  assert rindex.choose_factory(10_000, 384, 4.0) == "Flat"
  assert rindex.choose_factory(200_000, 384, 4.0) == "HNSW32"
  assert rindex.choose_factory(1_000_000, 384, 4.0) == "IVF1024,PQ96x4fs,RFlat"
  assert rindex.choose_factory(1_000_000, 384, 1.0) == "IVF4096,PQ48"  # raw vectors exceed 1 GB
  assert rindex.choose_factory(5_000_000, 384, 4.0) == "IVF8192,PQ48"
  assert rindex.choose_factory(50_000, 384, 0.01) == "IVF1024,PQ48"  # Flat exceeds 10 MB
  assert rindex.choose_factory(50_000, 64, 0.0009) == "IVF1024,PQ4"
  with pytest.raises(UserError, match="memory_budget_gb"):
    rindex.choose_factory(50_000_000, 384, 0.01)


@pytest.mark.parametrize("spec,match", [
    ("Bogus", "invalid FAISS index spec"),
    ("IVF16,PQ7", "not divisible by PQ m=7"),
    ("IVF4096,Flat", "fewer than the 4096 IVF lists"),
])
def test_bad_specs_are_user_errors(spec, match):
  with pytest.raises(UserError, match=match):
    rindex.build_index(clustered(1000, 64, seed=7), spec=spec)


def test_bad_inputs_are_user_errors(tmp_path):
  x = clustered(100, 8, seed=8)
  with pytest.raises(UserError, match="metric"):
    rindex.build_index(x, metric="cosine")
  with pytest.raises(UserError, match="index width"):
    rindex.search(rindex.build_index(x), x[:, :4], k=3)
  with pytest.raises(UserError, match="no FAISS index"):
    rindex.load_index(tmp_path / "missing.faiss")
