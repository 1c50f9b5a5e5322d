"""Training and forward throughput of a config on random tokens: one JSON line.

    python bench/train_throughput.py --config bench_small [--steps 5] [--profile DIR]
        [--config.model.dtype=bfloat16]

Decoder tokens per second (B*L per step; neighbour tokens are not counted), median over
timed steps after warm-up, forward+backward+AdamW through the project's one train step,
and forward only. Also XLA's FLOP counts of both programs, the achieved GFLOP/s, the
process CPU seconds per step (stable when other processes share the cores, unlike wall
time) and the 1-minute load average before and after, since a loaded machine slows
every number. Model FLOPs per token (`training.flops`: decoder, attention, CCA, neighbour
encoder, output projection) give the model FLOP/s and MFU against the device's peak: a
table of accelerators, or for a CPU the fastest jitted float32 2048^2 matmul of this run.
`--profile DIR` traces two train steps into DIR (open it with TensorBoard's profile plugin
or Perfetto) and adds the train step's most expensive XLA ops.

On Linux with glibc >= 2.35, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` lets malloc back
XLA's per-step buffers (2.3 GB of temporaries for a bench_small train step, mapped and
unmapped every step) with transparent huge pages: about 500k fewer page faults per
step, measured ~18% faster training on 2 cores. The tunable is recorded in the output.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import models  # noqa: E402
from models.layers import Spec  # noqa: E402
from common import cli  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from training import flops as flops_lib, sharding  # noqa: E402
from training.state import create_train_state  # noqa: E402
from training.step import make_train_step  # noqa: E402

PROFILE_TOP_OPS = 15


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of the config's shapes with random tokens (and what the family retrieves)."""
  spec = Spec.from_config(config.model)
  family = models.get_family(spec)
  return family.example_batch(spec, config.data.batch_size, config.data.seq_len, rng)


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time_steps(fn: Callable[[], Any], steps: int, bar: tqdm) -> tuple[float, float]:
  """Median wall and median process-CPU seconds of `fn()` (waited for) over `steps` calls."""
  walls, cpus = [], []
  for _ in range(steps):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - wall)
    cpus.append(_cpu_seconds() - cpu)
    bar.update()
  return statistics.median(walls), statistics.median(cpus)


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _top_ops(trace_dir: Path, hlo_text: str, runs: int) -> list[list]:
  """[[XLA op, ms per run, its JAX op_name], ...]: the most expensive instructions of the
  program `hlo_text` in a trace (summed over threads)."""
  paths = sorted(trace_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not paths:
    return []
  op_names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      op_names[match.group(1)] = op_name.group(1) if op_name else ""
  total_ns = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(paths[-1])).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in op_names:
          total_ns[event.name] += event.duration_ns
  return [[name, round(ns / 1e6 / runs, 2), op_names[name]]
          for name, ns in total_ns.most_common(PROFILE_TOP_OPS)]


@cli_main
def main(argv=None) -> dict:
  p = cli.parser(__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  p.add_argument("--profile", metavar="DIR", default="",
                 help="also trace 2 train steps into DIR (jax.profiler)")
  args, config = cli.parse(p, argv)
  if args.steps < 1:
    raise UserError(f"--steps {args.steps} must be at least 1")
  load_before = os.getloadavg()[0]
  mesh = sharding.make_mesh(config.train)
  batch = sharding.shard_batch(random_batch(config, np.random.default_rng(0)), mesh)
  state, shardings = create_train_state(config, jax.random.PRNGKey(0), batch, mesh)
  loss_fn = models.make_loss_fn(config.model)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens = config.data.batch_size * config.data.seq_len

  compile_start = time.perf_counter()
  step = make_train_step(config, loss_fn, shardings, mesh).lower(state, batch).compile()
  forward = jax.jit(lambda p, b: loss_fn(p, b, None)[0]).lower(state.params, batch).compile()
  compile_s = time.perf_counter() - compile_start
  holder = {"state": state}

  def train_once():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  def forward_once():
    return forward(holder["state"].params, batch)

  with tqdm(total=2 * (2 + args.steps), desc=f"bench {config.name}", unit="step",
            file=sys.stderr, leave=False) as bar:
    warm_start = time.perf_counter()
    _time_steps(train_once, 2, bar)
    _time_steps(forward_once, 2, bar)
    warmup_s = time.perf_counter() - warm_start
    train_s, train_cpu_s = _time_steps(train_once, args.steps, bar)
    forward_s, forward_cpu_s = _time_steps(forward_once, args.steps, bar)

  train_flops, forward_flops = _flops(step), _flops(forward)
  model = flops_lib.model_flops(config.model, config.data.seq_len)
  peak, peak_source = flops_lib.peak_flops_per_s(jax.devices()[0], config.model.dtype)
  peak_total = peak * jax.device_count() if peak else None
  result = {
      "bench": "train_throughput", "config": config.name, "model": config.model.name,
      "dtype": config.model.dtype, "params": int(n_params), "batch": config.data.batch_size,
      "seq_len": config.data.seq_len, "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "train_step_s": train_s, "train_tokens_per_s": tokens / train_s,
      "forward_s": forward_s, "forward_tokens_per_s": tokens / forward_s,
      "train_cpu_s": train_cpu_s, "forward_cpu_s": forward_cpu_s,
      "train_flops_xla": train_flops, "forward_flops_xla": forward_flops,
      "train_gflops_per_s": train_flops / train_s / 1e9 if train_flops else None,
      "forward_gflops_per_s": forward_flops / forward_s / 1e9 if forward_flops else None,
      "model_flops_per_token_6n": 6 * n_params,
      "params_without_embeddings": models.count_params(state.params, exclude_embeddings=True),
      "model_flops_per_token": model.train, "model_flops_per_token_forward": model.forward,
      "model_flops_per_token_parts": dataclasses.asdict(model),
      "peak_flops_per_s_per_device": peak, "peak_source": peak_source,
      "mfu": tokens / train_s * model.train / peak_total if peak_total else None,
      "forward_mfu": tokens / forward_s * model.forward / peak_total if peak_total else None,
      "compile_s": compile_s, "warmup_s": warmup_s,
      "timed_steps": args.steps, "load_avg_1m": [load_before, os.getloadavg()[0]],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }
  if args.profile:
    trace_dir = Path(args.profile)
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(2):
        jax.block_until_ready(train_once())
    result["profile_dir"] = str(trace_dir)
    result["profile_top_ops_ms_per_step"] = _top_ops(trace_dir, step.as_text(), runs=2)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
