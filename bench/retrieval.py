"""Retrieval benchmark: embedder throughput and FAISS cost against datastore size.

    python bench/retrieval.py [--config NAME] [--sizes 10000,100000,1000000] [--out DIR]

Prints ONE JSON line: the embedder's tokens/s and chunks/s (batch size, dtype, devices) on
synthetic ~80-token texts, and per datastore size and index type (Flat, HNSW, IVF-PQ):
train time, add throughput, query throughput and recall@10 against exact search, on
clustered synthetic unit vectors of the embedder's width. Writes `retrieval.json` and
`retrieval_scaling.png` (cost against datastore size) to --out. Timings are medians of
--repeats runs (index builds are repeated only up to 20k vectors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# `python bench/retrieval.py` puts bench/ first on sys.path, where this file would shadow
# the `retrieval` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import faiss  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import cli  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from configs import base  # noqa: E402
from retrieval import index as rindex  # noqa: E402
from retrieval.embedder import Embedder  # noqa: E402

K = 10
BUILD_REPEAT_MAX = 20_000  # builds of more vectors than this are timed once


def clustered_unit_vectors(n: int, d: int, seed: int, clusters: int = 256, rank: int = 16,
                           block: int = 50_000) -> np.ndarray:
  """Unit vectors in clusters, each spread along its own low-rank subspace (embedding-like)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, d)).astype(np.float32)
  bases = (rng.normal(size=(clusters, rank, d)) / np.sqrt(rank)).astype(np.float32)
  out = np.empty((n, d), np.float32)
  for s in range(0, n, block):
    m = min(block, n - s)
    c = rng.integers(0, clusters, m)
    z = rng.normal(size=(m, rank)).astype(np.float32)
    x = centers[c] + np.einsum("nr,nrd->nd", z, bases[c]) + 0.1 * rng.normal(size=(m, d))
    out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def cpu_model() -> str:
  """The `model name` line of /proc/cpuinfo (what lscpu prints), or the platform's."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _texts(vocab: list[str], n: int, seed: int = 0) -> list[str]:
  """n texts of 40-90 random vocabulary words (~50-110 WordPiece tokens, like 64-token
  LM chunks re-tokenized; lengths vary, so length bucketing matters)."""
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(vocab, int(rng.integers(40, 91)))) for _ in range(n)]


class TorchReference:
  """bench/torch_bert.py in another Python (one with torch + transformers) as a worker."""

  def __init__(self, python: str, folder: Path, texts_json: Path, batch_size: int,
               max_tokens: int, threads: int):
    script = Path(__file__).with_name("torch_bert.py")
    self.proc = subprocess.Popen(
        [python, str(script), str(folder), str(texts_json), str(batch_size), str(max_tokens),
         str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    self.info = self._ask(None)

  def _ask(self, line: str | None) -> dict:
    if line is not None:
      self.proc.stdin.write(line + "\n")
      self.proc.stdin.flush()
    reply = self.proc.stdout.readline()
    if not reply:
      raise UserError("the PyTorch reference worker (bench/torch_bert.py) exited; check that "
                      "--torch-python has torch and transformers")
    return json.loads(reply)

  def run(self) -> float:
    return self._ask("run")["seconds"]

  def embeddings(self, path: Path) -> np.ndarray:
    self._ask(f"save {path}")
    return np.load(path)

  def close(self) -> None:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    self.proc.wait(timeout=60)


def bench_embedder(cfg, num_texts: int, repeats: int, dtypes: list[str], torch_python: str,
                   out: Path) -> dict:
  """Tokens/s of the embedder (each dtype) and, with torch_python, of PyTorch BertModel +
  mean pooling on the same texts: runs alternate (jax dtypes, then torch) `repeats` times,
  medians are compared; also the largest difference of each dtype's vectors from PyTorch's
  (all L2-normalised)."""
  embs = {dt: Embedder.load(cfg.embedder, cfg.embed_max_tokens, cfg.embed_batch_size, dt)
          for dt in dtypes}
  emb = embs[dtypes[0]]
  vocab = [w for w in (emb.folder / "vocab.txt").read_text().split() if w.isalpha() and len(w) > 2]
  texts = _texts(vocab, num_texts)
  tokens = sum(len(x) for x in emb.tokenize(texts))
  first_s = {dt: median_time(lambda e=e: e.embed_texts(texts), 1) for dt, e in embs.items()}
  torch = None
  if torch_python:
    (out / "texts.json").write_text(json.dumps(texts))
    torch = TorchReference(torch_python, emb.folder, out / "texts.json", cfg.embed_batch_size,
                           cfg.embed_max_tokens, threads=os.cpu_count() or 1)
    torch.run()  # warm-up
  times: dict[str, list[float]] = {dt: [] for dt in embs}
  vectors = {}
  for _ in range(repeats):
    for dt, e in embs.items():
      start = time.perf_counter()
      vectors[dt] = e.embed_texts(texts)
      times[dt].append(time.perf_counter() - start)
    if torch is not None:
      times.setdefault("torch", []).append(torch.run())
  result = {"embedder": cfg.embedder, "dim": emb.dim, "batch_size": emb.batch_size,
            "max_tokens": emb.max_tokens, "devices": emb.num_devices, "texts": num_texts,
            "tokens": tokens, "mean_tokens": round(tokens / num_texts, 1), "repeats": repeats}
  for dt in embs:
    s = float(np.median(times[dt]))
    result[dt] = {"first_run_s": round(first_s[dt], 2), "seconds": round(s, 3),
                  "seconds_all": [round(t, 3) for t in times[dt]],
                  "chunks_per_s": round(num_texts / s, 1), "tokens_per_s": round(tokens / s)}
  if torch is not None:
    s = float(np.median(times["torch"]))
    want = torch.embeddings(out / "torch_embeddings.npy")
    torch.close()
    result["torch"] = {"impl": "transformers BertModel + mean pooling (+ L2 norm)",
                       "torch_version": torch.info.get("torch"), "threads": torch.info.get("threads"),
                       "seconds": round(s, 3), "seconds_all": [round(t, 3) for t in times["torch"]],
                       "tokens_per_s": round(tokens / s)}
    for dt in embs:
      result[dt]["vs_torch"] = round(s / result[dt]["seconds"], 3)
      result[dt]["max_abs_diff_vs_torch"] = float(np.abs(vectors[dt] - want).max())
  return result


def bench_index(n: int, d: int, cfg, num_queries: int, repeats: int, kinds: list[str]
                ) -> list[dict]:
  data = clustered_unit_vectors(n + num_queries, d, seed=n)
  db, queries = data[:n], data[n:]
  metric = rindex.METRICS[cfg.metric]
  _, true_ids = faiss.knn(queries, db, K, metric)  # exact, without a second copy of db
  rows = []
  # Each index kind at each size: Flat, HNSW32, plain IVF-PQ, refined fast-scan IVF-PQ, and
  # what `auto` picks (marked "auto": true).
  auto = rindex.choose_factory(n, d, cfg.memory_budget_gb)
  kind_specs = {"flat": "Flat", "hnsw": f"HNSW{rindex.HNSW_M}",
                "ivfpq": rindex.ivfpq_factory(n, d, cfg.memory_budget_gb),
                "refined": rindex.refined_ivfpq_factory(n, d, cfg.memory_budget_gb), "auto": auto}
  specs = list(dict.fromkeys(kind_specs[k] for k in kinds if kind_specs.get(k)))
  for spec in specs:
    n_train = rindex.train_count(spec, n)
    train_times, add_times = [], []
    for _ in range(repeats if n <= BUILD_REPEAT_MAX else 1):
      index = rindex.make_index(n, d, cfg.metric, spec)
      trains = not index.is_trained
      start = time.perf_counter()
      rindex.train_index(index, db, n_train)
      train_times.append(time.perf_counter() - start)
      start = time.perf_counter()
      rindex.add_vectors(index, db)
      add_times.append(time.perf_counter() - start)
    train_s, add_s = float(np.median(train_times)), float(np.median(add_times))
    rindex.set_search_params(index, cfg.nprobe, cfg.ef_search)
    query_s = median_time(lambda: rindex.search(index, queries, K), repeats)
    _, ids = rindex.search(index, queries, K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, true_ids)])
    rows.append({"n": n, "d": d, "spec": spec, "auto": spec == auto, "metric": cfg.metric,
                 "train_vectors": n_train if trains else 0,
                 "train_s": round(train_s, 3), "add_s": round(add_s, 3),
                 "add_per_s": round(n / add_s), "queries": num_queries,
                 "query_per_s": round(num_queries / query_s, 1),
                 f"recall_at_{K}": round(float(recall), 4),
                 "index_mb": round(faiss.serialize_index(index).nbytes / 2**20, 1),
                 "nprobe": cfg.nprobe if "IVF" in spec else None,
                 "ef_search": cfg.ef_search if "HNSW" in spec else None,
                 "refine_k_factor": rindex.REFINE_K_FACTOR if "RFlat" in spec else None})
  return rows


def plot(rows: list[dict], path: Path) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  kind = lambda spec: ("IVF-PQ fast-scan + refine" if "RFlat" in spec else
                       "IVF-PQ" if spec.startswith("IVF") else spec)
  for spec_kind in dict.fromkeys(kind(r["spec"]) for r in rows):
    mine = sorted((r for r in rows if kind(r["spec"]) == spec_kind), key=lambda r: r["n"])
    ns = [r["n"] for r in mine]
    label = spec_kind
    axes[0].plot(ns, [r["train_s"] + r["add_s"] for r in mine], "o-", label=label)
    axes[1].plot(ns, [1e3 / r["query_per_s"] for r in mine], "o-", label=label)
    axes[2].plot(ns, [r[f"recall_at_{K}"] for r in mine], "o-", label=label)
  titles = ("build (train + add) [s]", "query [ms per query, batched]", f"recall@{K} vs exact")
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_xlabel("datastore size (vectors)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
  axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@cli_main
def main(argv: list[str] | None = None) -> dict:
  p = cli.parser(__doc__.splitlines()[0], config_required=False)
  p.add_argument("--sizes", default="10000,100000",
                 help="datastore sizes, comma separated (add 1000000 for the 1M point)")
  p.add_argument("--out", default="runs/bench_retrieval", help="where the JSON and PNG go")
  p.add_argument("--queries", type=int, default=1000, help="queries per datastore size")
  p.add_argument("--texts", type=int, default=1024, help="texts embedded per timing run")
  p.add_argument("--repeats", type=int, default=3, help="timing runs (the median is kept)")
  p.add_argument("--skip-embedder", action="store_true", help="benchmark FAISS only")
  p.add_argument("--index-kinds", default="flat,hnsw,ivfpq,auto",
                 help="index kinds per size, comma separated: flat, hnsw, ivfpq, refined, auto")
  p.add_argument("--embed-dtypes", default="float32",
                 help="embedder matmul dtypes to time, comma separated (float32, bfloat16)")
  p.add_argument("--torch-python", default=os.environ.get("RETROZOO_TORCH_PYTHON", ""),
                 help="a Python with torch + transformers: times PyTorch BertModel + mean "
                      "pooling on the same texts, alternating with ours (default "
                      "$RETROZOO_TORCH_PYTHON; empty: skip)")
  args, config = cli.parse(p, argv)
  cfg = (config or base.base_config()).retrieval
  try:
    sizes = [int(s) for s in args.sizes.split(",")]
  except ValueError:
    raise UserError(f"--sizes {args.sizes!r} must be comma-separated integers") from None
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"bench": "retrieval", "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "load_avg_1m_start": round(os.getloadavg()[0], 2)}
  if not args.skip_embedder:
    result["embedder"] = bench_embedder(cfg, args.texts, args.repeats,
                                        args.embed_dtypes.split(","), args.torch_python, out)
  d = result.get("embedder", {}).get("dim", base.base_config().model.realm.embedding_dim)
  kinds = args.index_kinds.split(",")
  rows = [row for n in sizes for row in bench_index(n, d, cfg, args.queries, args.repeats, kinds)]
  result["auto"] = {str(n): rindex.choose_factory(n, d, cfg.memory_budget_gb) for n in sizes}
  result["index"] = rows
  result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
  plot(rows, out / "retrieval_scaling.png")
  result["png"] = str(out / "retrieval_scaling.png")
  (out / "retrieval.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
