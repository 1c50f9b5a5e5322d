"""Training and forward throughput of a config on random tokens: one JSON line.

    python bench/train_throughput.py --config bench_small [--steps 5] [--config.model.dtype=bfloat16]

Decoder tokens per second (B*L per step; neighbour tokens are not counted), median over
timed steps after warm-up, forward+backward+AdamW through the project's one train step,
and forward only. Also model FLOPs per token (6N + attention) from XLA's cost analysis.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from common import cli  # noqa: E402
from common.errors import cli_main  # noqa: E402
from training import sharding  # noqa: E402
from training.state import create_train_state  # noqa: E402
from training.step import make_train_step  # noqa: E402


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of the config's shapes with random tokens (and random neighbours / candidates)."""
  m, d = config.model, config.data
  B, L, V = d.batch_size, d.seq_len, m.vocab_size
  tokens = rng.integers(1, V, size=(B, L + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((B, L), np.float32)}
  if m.name == "retro":
    C = L // m.chunk_size
    batch["neighbours"] = rng.integers(1, V, size=(B, C, m.num_neighbours, m.neighbour_len),
                                       dtype=np.int32)
  if m.name == "realm":
    K = m.realm.num_candidates
    batch["candidates"] = rng.integers(1, V, size=(B, K, m.realm.doc_len), dtype=np.int32)
    batch["candidate_embeddings"] = rng.standard_normal((B, K, m.realm.embedding_dim)
                                                        ).astype(np.float32)
  return batch


def _median_time(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@cli_main
def main(argv=None) -> dict:
  p = cli.parser(__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  args, config = cli.parse(p, argv)
  mesh = sharding.make_mesh(config.train)
  batch = sharding.shard_batch(random_batch(config, np.random.default_rng(0)), mesh)
  state, shardings = create_train_state(config, jax.random.PRNGKey(0), batch, mesh)
  loss_fn = models.make_loss_fn(config.model)
  step = make_train_step(config, loss_fn, shardings, mesh)
  forward = jax.jit(lambda p, b: loss_fn(p, b, None)[0])
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens = config.data.batch_size * config.data.seq_len

  holder = {"state": state}

  def train_once():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  compile_start = time.perf_counter()
  for _ in range(2):
    train_once()
    forward(holder["state"].params, batch).block_until_ready()
  warmup_s = time.perf_counter() - compile_start
  train_s = _median_time(train_once, args.steps)
  forward_s = _median_time(lambda: forward(holder["state"].params, batch), args.steps)
  cost = forward.lower(holder["state"].params, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  result = {
      "bench": "train_throughput", "config": config.name, "model": config.model.name,
      "dtype": config.model.dtype, "params": int(n_params), "batch": config.data.batch_size,
      "seq_len": config.data.seq_len, "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "train_step_s": train_s, "train_tokens_per_s": tokens / train_s,
      "forward_s": forward_s, "forward_tokens_per_s": tokens / forward_s,
      "forward_flops_xla": float(cost.get("flops", 0.0)) if cost else None,
      "model_flops_per_token_6n": 6 * n_params, "warmup_s": warmup_s, "timed_steps": args.steps,
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
