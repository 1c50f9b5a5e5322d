"""The results protocol's machinery (scripts/results.py says what it runs): the shared
`Recipe`, one training `Run`, and the `Runner` that trains a run only when an evaluation
that is not cached needs it, caching every evaluation in `<out>/evals/`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import configs  # noqa: E402
from common.artifacts import atomic_write_text  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.loop import train_and_evaluate  # noqa: E402
from training.overlap_eval import json_ready  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The schedule every model shares (its numbers live here only)."""
  steps: int  # baseline and RETRO from scratch
  extra_steps: int  # continued baseline, RETRO-fitting and REALM, from the baseline
  learning_rates: tuple[float, ...]  # swept on the baseline, seed 0
  fit_lr_scales: tuple[float, ...]  # RETRO-fitting's learning rate / the recipe's, swept (seed 0)
  warm_lr_scales: tuple[float, ...]  # the same for the continued baseline and REALM's reader
  seeds: tuple[int, ...]
  eval_batches: int  # 0 = the whole split
  curve_batches: int  # validation batches of the evaluations during training
  score_from: int = 63  # chunk_size - 1: REALM's query chunk is never scored

  def common(self, seed: int, lr: float) -> list[str]:
    return [f"seed={seed}", f"train.learning_rate={lr}", f"eval.score_from={self.score_from}",
            f"eval.batches={self.curve_batches}"]

  def checkpoint_steps(self, steps: int, evals: int = 4) -> tuple[int, ...]:
    """The steps a run keeps a checkpoint of: every steps // evals, and the last."""
    every = max(1, steps // evals)
    return tuple(sorted({*range(every, steps + 1, every), steps}))

  def schedule(self, steps: int, evals: int = 4) -> list[str]:
    every = self.checkpoint_steps(steps, evals)[0]
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.eval_every={every}", f"train.checkpoint_every={every}",
            "train.keep_checkpoints=100"]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the protocol: `configs/<config>.py` with `overrides`, in
  `<out>/runs/<name>`; `base` is the run whose checkpoint it starts from (train.init_from)."""
  name: str
  config: str
  overrides: tuple[str, ...]
  checkpoints: tuple[int, ...]  # the steps it keeps (for the curves)
  base: "Run | None" = None


class Runner:
  """Evaluates the protocol's runs under `out`, training a run only when an evaluation that
  is not cached needs it (or a run that starts from it does).

  Evaluations are cached in `<out>/evals/` (committed: a later sitting on a fresh machine
  reuses them without the checkpoints) with the run's config and the code's commit; a
  run's evaluation curve is kept in `<out>/logs/<run>.jsonl`. Checkpoints in `<out>/runs/`
  are only needed while a run's evaluations or the runs that start from it are pending.
  """

  def __init__(self, out: Path, recipe: Recipe):
    self.out, self.recipe = out, recipe
    for sub in ("evals", "logs"):
      (out / sub).mkdir(parents=True, exist_ok=True)
    self.seconds: dict[str, float] = {}

  def run(self, name: str, config: str, seed: int, lr: float, steps: int, evals: int = 4,
          base: Run | None = None, extra: tuple[str, ...] = ()) -> Run:
    """A run on the recipe's schedule: `steps` steps, `evals` evaluations and checkpoints."""
    r = self.recipe
    init = (f"train.init_from={self.workdir(base)}",) if base else ()
    return Run(name, config, tuple(r.common(seed, lr) + r.schedule(steps, evals)) + init + extra,
               r.checkpoint_steps(steps, evals), base)

  def workdir(self, run: Run) -> Path:
    return self.out / "runs" / run.name

  def ensure(self, run: Run) -> Path:
    """Trains `run` (and first the run it starts from) unless it has finished."""
    workdir = self.workdir(run)
    if not (workdir / "final_metrics.json").exists():
      if run.base is not None:
        self.ensure(run.base)
      start = time.perf_counter()
      final = train_and_evaluate(configs.load(run.config, list(run.overrides)), str(workdir))
      if final.get("stopped"):  # SIGTERM / Ctrl-C: the run saved its step; stop here too
        print(f"results: run {run.name!r} stopped ({final['stopped']}); rerun the same "
              f"command to resume", flush=True)
        raise SystemExit(0)
      self.seconds[f"train/{run.name}"] = round(time.perf_counter() - start, 1)
    log = self.out / "logs" / f"{run.name}.jsonl"
    if not log.exists():
      lines = [line for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if "eval/perplexity" in line]
      atomic_write_text(log, "\n".join(lines) + "\n")
    return workdir

  def eval(self, key: str, run: Run, **kwargs: Any) -> dict[str, Any]:
    path = self.out / "evals" / (key.replace("/", "__") + ".json")
    identity = {"run": run.name, "config": run.config, "overrides": list(run.overrides)}
    if path.exists():
      cached = json.loads(path.read_text())
      if {k: cached.get(k) for k in identity} == identity:  # else: another recipe's run
        return cached
    workdir = self.ensure(run)
    start = time.perf_counter()
    result = evaluate(workdir, batches=self.recipe.eval_batches, write=False,
                      overrides=[f"eval.score_from={self.recipe.score_from}"], **kwargs)
    chunks = result.get("chunks")
    if chunks is not None:  # per-[sequence, chunk] scores, for the overlap joins of report.py
      np.savez_compressed(path.with_suffix(".npz"), **dataclasses.asdict(chunks))
    result = json_ready(result)
    result.update(identity, commit=_commit())
    self.seconds[f"eval/{key}"] = round(time.perf_counter() - start, 1)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _commit() -> str:
  """The code's git commit (+ "-dirty" for uncommitted changes), recorded with each result."""
  root = Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           text=True, capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")
