"""Evaluation throughput of the base LM vs the kNN-LM over it: one JSON line.

    python bench/knnlm.py [--workdir runs/baseline_small] [--batches 5] [--entries 1000000]
        [--config knnlm_small] [--config.retrieval.nprobe=8]

Validation-style perplexity evaluation, decoder tokens per second (B*L per batch), median
over timed batches after warm-up:
- `lm`: the LM forward and the targets' log-probabilities;
- `knnlm_approximate`: the same forward, which also returns the kNN keys, a FAISS search of
  every position's key in the datastore, p_kNN of the targets and the log-space
  interpolation (Khandelwal et al. 2020);
- `knnlm_exact`: the same with distances recomputed from the stored float16 keys.

With `--workdir` (a trained transformer/knnlm run) the real datastore of the training split
under that checkpoint is used (built once and cached, as `eval.py --knn` does). Without it
the config's model is randomly initialised and a synthetic datastore of `--entries` random
keys is indexed with the config's index rule (`retrieval.index`, `auto`: at 1M entries the
refined fast-scan IVF-PQ `IVF1024,PQ64x4fs,RFlat`, whose distances are exact already, so
`knnlm_exact` needs no re-ranking of its own).
The search runs on the host (faiss-cpu) while the next batch's forward runs on the device:
JAX dispatches asynchronously, so the two overlap.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import models  # noqa: E402
from common import cli  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from models import knnlm  # noqa: E402
from data import dataset  # noqa: E402
from retrieval import knn_datastore  # noqa: E402
from retrieval import index as index_lib  # noqa: E402
from training import checkpoint, evaluation  # noqa: E402


def synthetic_datastore(directory: Path, entries: int, dim: int, vocab_size: int,
                        config) -> knn_datastore.KnnDatastore:
  """A datastore of `entries` random float16 keys (clustered, like LM states) and tokens."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(1024, dim)).astype(np.float32)
  keys = np.lib.format.open_memmap(directory / "keys.npy", "w+", np.float16, (entries, dim))
  for s in range(0, entries, 100_000):
    n = min(100_000, entries - s)
    keys[s:s + n] = centers[rng.integers(0, 1024, n)] + 0.5 * rng.normal(size=(n, dim))
  keys.flush()
  np.save(directory / "values.npy", rng.integers(1, vocab_size, entries, dtype=np.int32))
  r = config.retrieval
  spec = (index_lib.choose_factory(entries, dim, r.memory_budget_gb) if r.index == "auto"
          else r.index)
  index = index_lib.build_index(keys, "l2", spec, nprobe=r.nprobe, ef_search=r.ef_search)
  index_lib.save_index(index, directory / "index.faiss")
  return knn_datastore.KnnDatastore(directory, {"index_spec": spec}, r.nprobe, r.ef_search)


def _cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return ""


def _timed(run_batch: Callable[[int], Any], batches: int, bar: tqdm) -> list[float]:
  """Seconds per batch of a pipelined loop: batch i+1 is dispatched before batch i's
  result is waited for, as an evaluation loop would do."""
  times = []
  pending = run_batch(0)
  for i in range(1, batches + 1):
    start = time.perf_counter()
    nxt = run_batch(i) if i < batches else None
    jax.block_until_ready(pending())
    times.append(time.perf_counter() - start)
    pending = nxt
    bar.update()
  return times


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = cli.parser(__doc__.splitlines()[0], config_required=False)
  p.set_defaults(config="knnlm_small")
  p.add_argument("--workdir", default="", help="trained transformer/knnlm run (real datastore)")
  p.add_argument("--batches", type=int, default=5, help="timed batches per round (after 2 "
                 "warm-up)")
  p.add_argument("--rounds", type=int, default=3,
                 help="rounds; each times lm, approximate and exact in turn (alternating, so "
                      "a shared machine's load hits all three alike); medians over all")
  p.add_argument("--entries", type=int, default=1_000_000,
                 help="synthetic datastore size when no --workdir is given")
  args, config = cli.parse(p, argv)
  if args.batches < 1:
    raise UserError(f"--batches {args.batches} must be at least 1")
  load_before = os.getloadavg()[0]
  tmp = None
  B, L = config.eval.batch_size, config.data.seq_len
  if args.workdir:
    config, params = evaluation.load_checkpoint(args.workdir)
    B, L = config.eval.batch_size, config.data.seq_len
    if not models.get_family(config.model).knn_key:
      raise UserError(f"{args.workdir} holds a {config.model.name!r} model; the kNN-LM "
                      f"benchmark needs a transformer or knnlm run")
  else:
    params = models.init_params(config.model, jax.random.PRNGKey(0),
                                {"inputs": np.ones((1, L), np.int32)})
  model = models.get_model(config.model)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_key=True))
  lm_target = jax.jit(models.token_log_probs)
  T, k, lam = config.eval.knn_temperature, config.eval.knn_k, config.eval.knn_lam
  mix = jax.jit(lambda lm, d, t, y: knnlm.interpolate(
      lm, knnlm.knn_target_log_probs(d, t, y, T), lam))

  build_start = time.perf_counter()
  if args.workdir:
    prepared = dataset.prepare(config)
    step = checkpoint.restore_meta(args.workdir)["step"]
    store, _ = evaluation.knn_datastore(config, params, prepared, step)
    part = prepared.split("validation")
    batches = [part.batch(idx) for idx in dataset.eval_indices(part.num_sequences, B)]
    batches = batches[:args.batches + 2]
  else:
    tmp = tempfile.TemporaryDirectory(prefix="bench_knnlm_")
    store = synthetic_datastore(Path(tmp.name), args.entries, config.model.width,
                                config.model.vocab_size, config)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(args.batches + 2):
      tokens = rng.integers(1, config.model.vocab_size, (B, L + 1), dtype=np.int32)
      batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  build_s = time.perf_counter() - build_start
  batches = [batches[i % len(batches)] for i in range(args.batches + 2)]

  def lm_batch(i: int) -> Callable[[], Any]:
    logits, _ = apply(params, batches[i]["inputs"])
    out = lm_target(logits, batches[i]["targets"])
    return lambda: out

  def knn_batch(exact: bool) -> Callable[[int], Callable[[], Any]]:
    def run(i: int) -> Callable[[], Any]:
      logits, keys = apply(params, batches[i]["inputs"])  # dispatched, not waited for
      lm = lm_target(logits, batches[i]["targets"])

      def finish():
        q_NxD = np.asarray(keys).reshape(B * L, -1)
        d_NxK, t_NxK = store.search(q_NxD, k, exact=exact)
        return mix(lm, d_NxK.reshape(B, L, k), t_NxK.reshape(B, L, k), batches[i]["targets"])
      return finish
    return run

  result: dict[str, Any] = {"bench": "knnlm", "config": config.name,
                            "workdir": args.workdir or None}
  modes = (("lm", lm_batch), ("knnlm_approximate", knn_batch(False)),
           ("knnlm_exact", knn_batch(True)))
  times: dict[str, list[float]] = {name: [] for name, _ in modes}
  with tqdm(total=3 * (2 + args.rounds * args.batches), desc="bench knnlm", unit="batch",
            file=sys.stderr, leave=False) as bar:
    for name, fn in modes:
      _timed(fn, 2, bar)  # warm-up: compiles, pages the datastore in
    for _ in range(args.rounds):
      for name, fn in modes:
        times[name] += _timed(fn, args.batches, bar)
  for name, _ in modes:
    seconds = statistics.median(times[name])
    result[f"{name}_s_per_batch"] = seconds
    result[f"{name}_tokens_per_s"] = B * L / seconds
  lm_tps = result["lm_tokens_per_s"]
  result.update(
      knnlm_approximate_vs_lm=result["knnlm_approximate_tokens_per_s"] / lm_tps,
      knnlm_exact_vs_lm=result["knnlm_exact_tokens_per_s"] / lm_tps,
      rounds=args.rounds, batches_per_round=args.batches,
      exact_distances_from_index=store.exact_distances,
      cpu_model=_cpu_model(), datastore_entries=int(store.keys.shape[0]), key_dim=int(store.keys.shape[1]),
      index=type(faiss.downcast_index(store.index)).__name__,
      index_spec=store.manifest.get("index_spec"), nprobe=config.retrieval.nprobe,
      ef_search=config.retrieval.ef_search, k=k, batch=B, seq_len=L,
      datastore_build_s=build_s, faiss_threads=faiss.omp_get_max_threads(),
      devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
      cpu_count=os.cpu_count(), load_avg_1m=[load_before, os.getloadavg()[0]])
  print(json.dumps(result))
  if tmp is not None:
    tmp.cleanup()
  return result


if __name__ == "__main__":
  main()
