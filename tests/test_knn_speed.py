"""kNN-LM search fast paths: a refined index's distances are the exact ones."""

from __future__ import annotations

import numpy as np

from retrieval import index as rindex
from retrieval import knn_datastore


def _store(tmp_path, spec: str, n: int = 6000, d: int = 32) -> knn_datastore.KnnDatastore:
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(16, d))
  keys = (centers[rng.integers(0, 16, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float16)
  np.save(tmp_path / "keys.npy", keys)
  np.save(tmp_path / "values.npy", rng.integers(1, 100, n, dtype=np.int32))
  index = rindex.build_index(keys, "l2", spec, nprobe=8)
  rindex.save_index(index, tmp_path / "index.faiss")
  return knn_datastore.KnnDatastore(tmp_path, {"index_spec": spec}, nprobe=8)


def test_refined_index_distances_are_exact(tmp_path):
  """exact=True on a refined index skips the numpy re-ranking, and loses nothing: its
  distances are the squared L2 to the stored keys of the ids it returns, sorted."""
  store = _store(tmp_path, "IVF16,PQ16x4fs,RFlat", n=3000)
  assert store.exact_distances
  rng = np.random.default_rng(1)
  q_NxD = np.asarray(store.keys[rng.choice(len(store.keys), 100)], np.float32)
  q_NxD += 0.3 * rng.normal(size=q_NxD.shape).astype(np.float32)
  dists_NxK, tokens_NxK = store.search(q_NxD, 8, exact=True)
  np.testing.assert_array_equal(dists_NxK, store.search(q_NxD, 8, exact=False)[0])
  store.exact_distances = False  # force the numpy re-ranking from the float16 keys
  want_dists, want_tokens = store.search(q_NxD, 8, exact=True)
  np.testing.assert_allclose(dists_NxK, want_dists, rtol=1e-4, atol=1e-4)
  assert (tokens_NxK == want_tokens).mean() >= 0.99  # equal up to near-ties
  _, ids_NxK = store.index.search(q_NxD, 8)
  keys = np.asarray(store.keys, np.float32)
  true_NxK = np.argsort(((q_NxD[:, None] - keys[None]) ** 2).sum(-1), axis=1)[:, :8]
  assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ids_NxK, true_NxK)]) >= 0.8


def test_plain_ivfpq_exact_reranks(tmp_path):
  store = _store(tmp_path, "IVF16,PQ8x4fs", n=2000)
  assert not store.exact_distances
  q_NxD = np.asarray(store.keys[:50], np.float32)
  approx, _ = store.search(q_NxD, 4, exact=False)
  exact, _ = store.search(q_NxD, 4, exact=True)
  assert np.all(exact[:, 0] < 1e-3) and not np.allclose(approx, exact)
