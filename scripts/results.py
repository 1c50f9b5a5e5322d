"""The results protocol: `python scripts/results.py [--quick] [--out results] [--until STAGE]`.

One tuned recipe for every model, 3 seeds, hyperparameters chosen on validation and numbers
reported on the test split (held-out documents distinct from validation), every model
scored on the same target tokens (`eval.score_from`: the targets after REALM's query chunk):
1. a learning-rate sweep of the baseline (seed 0) picks the recipe's learning rate;
2. per seed: the baseline (`steps`), RETRO from scratch with the training-split datastore
   (`steps`), and from the baseline's checkpoint, for `extra_steps` more: the baseline
   continued (the like-for-like reference), RETRO-fitting on the First Folio editions of the
   training plays (decoder frozen), and the REALM reader (frozen index; seed 0 also with a
   refreshed index); the learning rates of RETRO-fitting and of training on from the
   baseline are swept on validation (seed 0);
3. evaluations on validation and test (cached one file each): RETRO with retrieval on and
   off; the RETRO-fitted model with the Folio datastore holding the held-out plays' Folio
   editions (related text, never the evaluated modern text), without them, and off; kNN-LM
   on the baseline with (lambda, temperature) chosen on validation; REALM with k=1 and k=4;
   retrieval on vs off over training (seed 0 checkpoints).
Writes `<out>/RESULTS.md`, `<out>/results.json` and the plots (scripts/report.py). Every
part resumes: training from its checkpoints, evaluations from `<out>/evals/`. Each part (one
model, one seed) takes well under 2 hours on 2 cores, so the run can span several sittings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import configs  # noqa: E402
import report  # noqa: E402  (scripts/report.py)
from common.artifacts import atomic_write_text  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from data import dataset  # noqa: E402
from retrieval import datastore  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.loop import train_and_evaluate  # noqa: E402

FOLIO = "shakespeare_folio"
KNN_TEMPERATURES = (1.0, 5.0, 20.0)
STAGES = ("sweep", "train", "eval", "report")


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

  def schedule(self, steps: int, evals: int = 4) -> list[str]:
    every = max(1, steps // evals)
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.eval_every={every}", f"train.checkpoint_every={every}",
            "train.keep_checkpoints=100"]


FULL = Recipe(steps=400, extra_steps=150, learning_rates=(1e-3, 3e-3, 6e-3),
              fit_lr_scales=(1.0, 3.0), warm_lr_scales=(0.1, 1.0), seeds=(0, 1, 2),
              eval_batches=0, curve_batches=10)
QUICK = Recipe(steps=30, extra_steps=10, learning_rates=(3e-3,), fit_lr_scales=(1.0,),
               warm_lr_scales=(0.1,), seeds=(0,), eval_batches=4, curve_batches=2)


class Runner:
  """Trains runs and evaluates checkpoints under `out`, skipping whatever is done."""

  def __init__(self, out: Path, recipe: Recipe):
    self.out, self.recipe = out, recipe
    (out / "evals").mkdir(parents=True, exist_ok=True)
    self.seconds: dict[str, float] = {}

  def train(self, run: str, name: str, overrides: list[str]) -> Path:
    workdir = self.out / "runs" / run
    if not (workdir / "final_metrics.json").exists():
      start = time.perf_counter()
      final = train_and_evaluate(configs.load(name, overrides), str(workdir))
      if final.get("stopped"):  # SIGTERM / Ctrl-C: the run saved its step; stop here too
        print(f"results: run {run!r} stopped ({final['stopped']}); rerun the same command to "
              f"resume", flush=True)
        raise SystemExit(0)
      self.seconds[f"train/{run}"] = round(time.perf_counter() - start, 1)
    return workdir

  def eval(self, key: str, workdir: Path, **kwargs: Any) -> dict[str, Any]:
    path = self.out / "evals" / (key.replace("/", "__") + ".json")
    if path.exists():
      cached = json.loads(path.read_text())
      if cached.get("workdir") == str(workdir):  # (a run of another recipe: evaluate anew)
        return cached
    start = time.perf_counter()
    batches = self.recipe.eval_batches
    result = evaluate(workdir, batches=batches, write=False,
                      overrides=[f"eval.score_from={self.recipe.score_from}"], **kwargs)
    chunks = result.get("chunks")
    if chunks is not None:  # per-[sequence, chunk] scores, for the overlap joins of report.py
      np.savez(path.with_suffix(".npz"), **dataclasses.asdict(chunks))
    result = {k: v for k, v in result.items() if _jsonable(v)}
    self.seconds[f"eval/{key}"] = round(time.perf_counter() - start, 1)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _jsonable(value: Any) -> bool:
  try:
    json.dumps(value)
    return True
  except TypeError:
    return False


def sweep(runner: Runner) -> dict[str, Any]:
  """The baseline at every swept learning rate (seed 0); the best on validation wins."""
  r = runner.recipe
  out = {}
  for lr in r.learning_rates:
    workdir = runner.train(f"baseline_lr{lr:g}_s0", "baseline_small",
                           r.common(0, lr) + r.schedule(r.steps))
    out[f"{lr:g}"] = runner.eval(f"sweep/{lr:g}", workdir, split="validation")["perplexity"]
  best = min(out, key=out.get)
  return {"perplexity": out, "learning_rate": float(best)}


def fit_overrides(recipe: Recipe, seed: int, lr: float, base: Path, scale: float) -> list[str]:
  """RETRO-fitting from `base` on the Folio of the training plays (held-out editions out)."""
  return (recipe.common(seed, lr * scale) + [f"train.init_from={base}"] +
          recipe.schedule(recipe.extra_steps, evals=3) +
          [f"retrieval.datastore={FOLIO}", "retrieval.datastore_drop_heldout=True"])


def fit_sweep(runner: Runner, lr: float) -> dict[str, Any]:
  """RETRO-fitting's learning rate (only the new parameters train): each scale of the
  recipe's on seed 0, scored on validation with the related Folio datastore."""
  r, seed = runner.recipe, runner.recipe.seeds[0]
  base = runner.out / "runs" / f"baseline_lr{lr:g}_s{seed}"
  out = {}
  for scale in r.fit_lr_scales:
    workdir = runner.train(f"fit_x{scale:g}_s{seed}", "retro_fit",
                           fit_overrides(r, seed, lr, base, scale))
    out[f"{scale:g}"] = runner.eval(f"fit_sweep/{scale:g}", workdir, split="validation",
                                    datastore=FOLIO, drop_heldout=False)["perplexity"]
  return {"perplexity": out, "scale": float(min(out, key=out.get))}


def warm_overrides(recipe: Recipe, seed: int, lr: float, base: Path) -> list[str]:
  return (recipe.common(seed, lr) + [f"train.init_from={base}"] +
          recipe.schedule(recipe.extra_steps, evals=3))


def warm_sweep(runner: Runner, lr: float) -> dict[str, Any]:
  """The learning rate of training on from a trained baseline (the continued baseline and
  REALM's reader): re-warming to the recipe's peak can undo what the baseline learned, so
  each scale is tried on the continued baseline (seed 0) and chosen on validation."""
  r, seed = runner.recipe, runner.recipe.seeds[0]
  base = runner.out / "runs" / f"baseline_lr{lr:g}_s{seed}"
  out = {}
  for scale in r.warm_lr_scales:
    workdir = runner.train(f"cont_x{scale:g}_s{seed}", "baseline_small",
                           warm_overrides(r, seed, lr * scale, base))
    out[f"{scale:g}"] = runner.eval(f"warm_sweep/{scale:g}", workdir,
                                    split="validation")["perplexity"]
  return {"perplexity": out, "scale": float(min(out, key=out.get))}


def train_all(runner: Runner, lr: float, fit_scale: float, warm_scale: float
              ) -> dict[str, dict[int, Path]]:
  """Every run of every seed (in seed order, so seed 0's rows are complete first)."""
  r = runner.recipe
  runs: dict[str, dict[int, Path]] = {}
  for seed in r.seeds:
    base = runner.train(f"baseline_lr{lr:g}_s{seed}", "baseline_small",
                        r.common(seed, lr) + r.schedule(r.steps))
    warm = warm_overrides(r, seed, lr * warm_scale, base)
    plan = {
        f"cont_x{warm_scale:g}": ("cont", "baseline_small", warm),
        f"fit_x{fit_scale:g}": ("fit", "retro_fit", fit_overrides(r, seed, lr, base, fit_scale)),
        "retro": ("retro", "retro_small", r.common(seed, lr) + r.schedule(r.steps)),
        f"realm_x{warm_scale:g}": ("realm", "realm_small", warm + ["retrieval.refresh_every=0"]),
    }
    if seed == r.seeds[0]:
      plan[f"realm_refreshed_x{warm_scale:g}"] = ("realm_refreshed", "realm_small", warm + [
          f"retrieval.refresh_every={max(1, r.extra_steps // 3)}"])
    runs.setdefault("base", {})[seed] = base
    for label, (run, name, overrides) in plan.items():
      runs.setdefault(run, {})[seed] = runner.train(f"{label}_s{seed}", name, overrides)
  return runs


def evaluate_all(runner: Runner, runs: dict[str, dict[int, Path]]) -> dict[str, Any]:
  """Every evaluation of the protocol: key "<row>/<seed>/<split>" -> evaluate()'s result."""
  rows: dict[str, Any] = {}
  for split in ("validation", "test"):
    for seed in runner.recipe.seeds:
      def ev(row: str, run: str, **kwargs: Any) -> None:
        key = f"{row}/{seed}/{split}"
        rows[key] = runner.eval(key, runs[run][seed], split=split, **kwargs)
      ev("base", "base")
      ev("cont", "cont")
      ev("retro", "retro")
      ev("retro_off", "retro", retrieval=False)
      ev("fit_related", "fit", datastore=FOLIO, drop_heldout=False)
      ev("fit_unrelated", "fit")
      ev("fit_off", "fit", retrieval=False)
      for k in (1, 4):
        ev(f"realm_k{k}", "realm", k=k)
        if seed in runs["realm_refreshed"]:
          ev(f"realm_refreshed_k{k}", "realm_refreshed", k=k)
  rows.update(knn_rows(runner, runs["base"]))
  rows.update(curves(runner, runs))
  return rows


def knn_rows(runner: Runner, bases: dict[int, Path]) -> dict[str, Any]:
  """kNN-LM on each seed's baseline: (lambda, T) with the lowest validation perplexity,
  then the test perplexity at exactly that (lambda, T)."""
  rows = {}
  for seed, base in bases.items():
    val = {t: runner.eval(f"knn_T{t:g}/{seed}/validation", base, split="validation",
                          knn={"temperature": t})["knn"] for t in KNN_TEMPERATURES}
    best_t = min(val, key=lambda t: val[t]["best_perplexity"])
    lam = val[best_t]["best_lam"]
    test = runner.eval(f"knn_T{best_t:g}/{seed}/test", base, split="test",
                       knn={"temperature": best_t, "lam": lam})["knn"]
    at = next(s for s in test["sweep"] if s["lam"] == lam)
    rows[f"knn/{seed}/validation"] = {"perplexity": val[best_t]["best_perplexity"],
                                      "lam": lam, "temperature": best_t, "sweeps": val}
    rows[f"knn/{seed}/test"] = {"perplexity": at["perplexity_approximate"],
                                "perplexity_exact": at["perplexity_exact"], "lam": lam,
                                "temperature": best_t, "lm_perplexity": test["lm_perplexity"]}
  return rows


def curves(runner: Runner, runs: dict[str, dict[int, Path]]) -> dict[str, Any]:
  """Retrieval on vs off at every kept checkpoint of seed 0's RETRO-fitting (with the
  related Folio datastore) and RETRO from scratch, on validation."""
  seed = runner.recipe.seeds[0]
  out = {}
  for run, kwargs in (("fit", {"datastore": FOLIO, "drop_heldout": False}), ("retro", {})):
    workdir = runs[run][seed]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
      for mode, on in (("on", True), ("off", False)):
        key = f"curve_{run}_{mode}/{step}/validation"
        out[key] = runner.eval(key, workdir, split="validation", step=step, retrieval=on,
                               **(kwargs if on else {}))
  return out


# Datastores of reported rows: label -> (retrieval.datastore, datastore_drop_heldout).
DATASTORES = {"training split": ("", False),
              "First Folio with the held-out plays' editions": (FOLIO, False),
              "First Folio without them": (FOLIO, True)}


def leakage() -> dict[str, Any]:
  """Each reported datastore against the test split: shared document ids and test chunks
  held verbatim. UserError if either is non-zero: that would be copying the answer."""
  prepared = dataset.prepare(configs.load("retro_small"))
  out = {}
  for label, (spec, drop) in DATASTORES.items():
    config = configs.load("retro_small", [f"retrieval.datastore={spec}",
                                          f"retrieval.datastore_drop_heldout={drop}"])
    store = datastore.load_datastore(config, prepared).split
    out[label] = found = datastore.leakage(store, prepared.split("test"))
    if found["shared_doc_ids"] or found["verbatim_chunks"]:
      raise UserError(f"datastore {label!r} holds test text ({found}); a reported row must "
                      f"never retrieve the evaluated text itself")
  return out


def progress(out: Path) -> dict[str, list[str]]:
  """The runs under `out/runs` that finished and those started but not finished."""
  runs = sorted(p for p in (out / "runs").glob("*") if p.is_dir())
  return {"finished": [p.name for p in runs if (p / "final_metrics.json").exists()],
          "unfinished": [p.name for p in runs if not (p / "final_metrics.json").exists()],
          "evaluations": sorted(p.stem for p in (out / "evals").glob("*.json"))}


def run(out: Path, recipe: Recipe, until: str) -> dict[str, Any]:
  """Runs the protocol up to stage `until`, then writes results.json (and with "report"
  RESULTS.md and the plots); a partial run reports what it has so far."""
  runner = Runner(out, recipe)
  rows: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "leakage": leakage()}
  rows["sweep"] = sweep(runner)
  if STAGES.index(until) >= STAGES.index("train"):
    lr = rows["sweep"]["learning_rate"]
    rows["fit_sweep"] = fit_sweep(runner, lr)
    rows["warm_sweep"] = warm_sweep(runner, lr)
    runs = train_all(runner, lr, rows["fit_sweep"]["scale"], rows["warm_sweep"]["scale"])
    rows["runs"] = {run: {s: str(p) for s, p in by_seed.items()} for run, by_seed in runs.items()}
    if STAGES.index(until) >= STAGES.index("eval"):
      rows["evals"] = evaluate_all(runner, runs)
  rows["seconds"] = runner.seconds
  rows["progress"] = progress(out)
  rows["complete"] = until == "report"
  atomic_write_text(out / "results.json", json.dumps(rows, indent=1, default=str))
  if until == "report":
    md = report.write(rows, out, out / "evals")
    print(md)
  return rows


def report_only(out: Path, recipe: Recipe) -> dict[str, Any]:
  """RESULTS.md from what `out` holds now (no training, no evaluation): for a report
  between sittings of a run that is not finished."""
  path = out / "results.json"
  rows = json.loads(path.read_text()) if path.exists() else {
      "recipe": dataclasses.asdict(recipe), "sweep": {"perplexity": {}, "learning_rate": 0}}
  cached = {p.stem.replace("__", "/"): json.loads(p.read_text())
            for p in (out / "evals").glob("*.json")}
  rows["evals"] = {**cached, **rows.get("evals", {})}
  sweeps = {"sweep": recipe.learning_rates, "fit_sweep": recipe.fit_lr_scales,
            "warm_sweep": recipe.warm_lr_scales}
  for name, values in sweeps.items():  # the sweeps so far, from their evaluations
    done = {k.split("/")[1]: v["perplexity"] for k, v in cached.items()
            if k.startswith(f"{name}/")}
    if done and not rows.get(name, {}).get("perplexity"):
      rows[name] = {"perplexity": done, "partial": len(done) < len(values),
                    ("learning_rate" if name == "sweep" else "scale"):
                        float(min(done, key=done.get)) if done else 0.0}
  rows["progress"] = progress(out)
  md = report.write(rows, out, out / "evals")
  print(md)
  return rows


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results", help="output folder (default results/)")
  p.add_argument("--quick", action="store_true",
                 help=f"the shortened re-run: {QUICK.steps} + {QUICK.extra_steps} steps, one "
                      f"seed, {QUICK.eval_batches} evaluation batches")
  p.add_argument("--until", choices=STAGES, default="report",
                 help="stop after this stage (e.g. train: only the runs, for a sitting)")
  p.add_argument("--report-only", action="store_true",
                 help="write RESULTS.md from what is done so far; train and evaluate nothing")
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "evals").mkdir(exist_ok=True)
  recipe = QUICK if args.quick else FULL
  if args.report_only:
    return report_only(out, recipe)
  return run(out, recipe, args.until)


if __name__ == "__main__":
  main()
