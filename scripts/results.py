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
part resumes: training from its checkpoints, evaluations from `<out>/evals/`, which is
committed with the evaluation curves in `<out>/logs/`: a run is trained only while one of its
evaluations is missing, so the protocol spans sittings on fresh machines seed by seed (each
run, one model and one seed, well under 2 hours on 2 cores; a seed's runs and evaluations
about 3 hours; checkpoints need not survive).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import configs  # noqa: E402
import report  # noqa: E402  (scripts/report.py)
from common.artifacts import atomic_write_text  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from data import dataset  # noqa: E402
from retrieval import datastore  # noqa: E402
from runner import Recipe, Run, Runner  # noqa: E402  (scripts/runner.py)

FOLIO = "shakespeare_folio"
KNN_TEMPERATURES = (1.0, 5.0, 20.0)
STAGES = ("sweep", "train", "eval", "report")

FULL = Recipe(steps=400, extra_steps=600, learning_rates=(1e-3, 3e-3, 6e-3),
              fit_lr_scales=(1.0, 3.0), warm_lr_scales=(0.1, 1.0), seeds=(0, 1, 2),
              eval_batches=0, curve_batches=10)
QUICK = Recipe(steps=30, extra_steps=10, learning_rates=(3e-3,), fit_lr_scales=(1.0,),
               warm_lr_scales=(0.1,), seeds=(0,), eval_batches=4, curve_batches=2)


def baseline(runner: Runner, seed: int, lr: float) -> Run:
  r = runner.recipe
  return runner.run(f"baseline_lr{lr:g}_s{seed}", "baseline_small", seed, lr, r.steps)


def sweep(runner: Runner) -> dict[str, Any]:
  """The baseline at every swept learning rate (seed 0); the best on validation wins."""
  out = {}
  for lr in runner.recipe.learning_rates:
    out[f"{lr:g}"] = runner.eval(f"sweep/{lr:g}", baseline(runner, 0, lr),
                                 split="validation")["perplexity"]
  best = min(out, key=out.get)
  return {"perplexity": out, "learning_rate": float(best)}


def fit_run(runner: Runner, seed: int, lr: float, scale: float) -> Run:
  """RETRO-fitting from the baseline on the Folio of the training plays (held-out editions
  out); only the encoder and the cross-attention train, the first half of the steps under
  the copy curriculum (configs/retro_fit.py)."""
  return runner.run(f"fit_x{scale:g}_s{seed}", "retro_fit", seed, lr * scale,
                    runner.recipe.extra_steps, 3, baseline(runner, seed, lr),
                    (f"retrieval.datastore={FOLIO}", "retrieval.datastore_drop_heldout=True"))


def warm_run(runner: Runner, label: str, config: str, seed: int, lr: float, scale: float,
             extra: tuple[str, ...] = ()) -> Run:
  """Training on from the baseline at `scale` x its learning rate (continued baseline, REALM)."""
  return runner.run(f"{label}_x{scale:g}_s{seed}", config, seed, lr * scale,
                    runner.recipe.extra_steps, 3, baseline(runner, seed, lr), extra)


def fit_sweep(runner: Runner, lr: float) -> dict[str, Any]:
  """RETRO-fitting's learning rate: each scale of the recipe's on seed 0, scored on
  validation with the related Folio datastore."""
  out = {f"{s:g}": runner.eval(f"fit_sweep/{s:g}", fit_run(runner, 0, lr, s), split="validation",
                               datastore=FOLIO, drop_heldout=False)["perplexity"]
         for s in runner.recipe.fit_lr_scales}
  return {"perplexity": out, "scale": float(min(out, key=out.get))}


def warm_sweep(runner: Runner, lr: float) -> dict[str, Any]:
  """The learning rate of training on from a trained baseline (the continued baseline and
  REALM's reader): re-warming to the recipe's peak can undo what the baseline learned, so
  each scale is tried on the continued baseline (seed 0) and chosen on validation."""
  out = {f"{s:g}": runner.eval(f"warm_sweep/{s:g}",
                               warm_run(runner, "cont", "baseline_small", 0, lr, s),
                               split="validation")["perplexity"]
         for s in runner.recipe.warm_lr_scales}
  return {"perplexity": out, "scale": float(min(out, key=out.get))}


def plan(runner: Runner, seed: int, lr: float, fit_scale: float, warm_scale: float
         ) -> dict[str, Run]:
  """Every run of one seed: row name -> Run (nothing is trained here)."""
  r = runner.recipe
  runs = {"base": baseline(runner, seed, lr),
          "cont": warm_run(runner, "cont", "baseline_small", seed, lr, warm_scale),
          "fit": fit_run(runner, seed, lr, fit_scale),
          "retro": runner.run(f"retro_s{seed}", "retro_small", seed, lr, r.steps),
          "realm": warm_run(runner, "realm", "realm_small", seed, lr, warm_scale,
                            ("retrieval.refresh_every=0",))}
  if seed == r.seeds[0]:
    runs["realm_refreshed"] = warm_run(
        runner, "realm_refreshed", "realm_small", seed, lr, warm_scale,
        (f"retrieval.refresh_every={max(1, r.extra_steps // 3)}",))
  return runs


def evaluate_seed(runner: Runner, seed: int, runs: dict[str, Run]) -> dict[str, Any]:
  """Every evaluation of one seed: key "<row>/<seed>/<split>" -> evaluate()'s result."""
  rows: dict[str, Any] = {}
  for split in ("validation", "test"):
    def ev(row: str, run: str, **kwargs: Any) -> None:
      key = f"{row}/{seed}/{split}"
      rows[key] = runner.eval(key, runs[run], split=split, **kwargs)
    ev("base", "base")
    ev("cont", "cont")
    ev("fit_related", "fit", datastore=FOLIO, drop_heldout=False)
    ev("fit_unrelated", "fit")
    ev("fit_off", "fit", retrieval=False)
    ev("retro", "retro")
    ev("retro_off", "retro", retrieval=False)
    for k in (1, 4):
      ev(f"realm_k{k}", "realm", k=k)
      if "realm_refreshed" in runs:
        ev(f"realm_refreshed_k{k}", "realm_refreshed", k=k)
  rows.update(knn_rows(runner, seed, runs["base"]))
  if seed == runner.recipe.seeds[0]:
    rows.update(curves(runner, runs))
  return rows


def knn_rows(runner: Runner, seed: int, base: Run) -> dict[str, Any]:
  """kNN-LM on the seed's baseline: (lambda, T) with the lowest validation perplexity, then
  the test perplexity at exactly that (lambda, T)."""
  val = {t: runner.eval(f"knn_T{t:g}/{seed}/validation", base, split="validation",
                        knn={"temperature": t})["knn"] for t in KNN_TEMPERATURES}
  best_t = min(val, key=lambda t: val[t]["best_perplexity"])
  lam = val[best_t]["best_lam"]
  test = runner.eval(f"knn_T{best_t:g}/{seed}/test", base, split="test",
                     knn={"temperature": best_t, "lam": lam})["knn"]
  at = next(s for s in test["sweep"] if s["lam"] == lam)
  return {f"knn/{seed}/validation": {"perplexity": val[best_t]["best_perplexity"],
                                     "lam": lam, "temperature": best_t, "sweeps": val},
          f"knn/{seed}/test": {"perplexity": at["perplexity_approximate"],
                               "perplexity_exact": at["perplexity_exact"], "lam": lam,
                               "temperature": best_t, "lm_perplexity": test["lm_perplexity"]}}


def curves(runner: Runner, runs: dict[str, Run]) -> dict[str, Any]:
  """Retrieval on vs off at every kept checkpoint of the seed's RETRO-fitting (with the
  related Folio datastore) and RETRO from scratch, on validation."""
  out = {}
  for name, kwargs in (("fit", {"datastore": FOLIO, "drop_heldout": False}), ("retro", {})):
    for step in runs[name].checkpoints:
      for mode, on in (("on", True), ("off", False)):
        key = f"curve_{name}_{mode}/{step}/validation"
        out[key] = runner.eval(key, runs[name], split="validation", step=step, retrieval=on,
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
  """The runs on this machine's disk (`out/runs`) that finished and those started but not
  finished, and the evaluations cached (`out/evals`, kept across sittings)."""
  runs = sorted(p for p in (out / "runs").glob("*") if p.is_dir())
  return {"finished": [p.name for p in runs if (p / "final_metrics.json").exists()],
          "unfinished": [p.name for p in runs if not (p / "final_metrics.json").exists()],
          "evaluations": sorted(p.stem for p in (out / "evals").glob("*.json"))}


def run(out: Path, recipe: Recipe, until: str) -> dict[str, Any]:
  """Runs the protocol up to stage `until`, seed by seed (so each seed's rows are complete
  before the next starts), then writes results.json (and with "report" RESULTS.md and the
  plots); a partial run reports what it has so far."""
  runner = Runner(out, recipe)
  rows: dict[str, Any] = {"recipe": dataclasses.asdict(recipe)}
  rows["sweep"] = sweep(runner)
  rows["leakage"] = leakage()  # (after the sweep, which needs no datastore)
  if STAGES.index(until) >= STAGES.index("train"):
    lr = rows["sweep"]["learning_rate"]
    rows["fit_sweep"] = fit_sweep(runner, lr)
    rows["warm_sweep"] = warm_sweep(runner, lr)
    plans = {seed: plan(runner, seed, lr, rows["fit_sweep"]["scale"], rows["warm_sweep"]["scale"])
             for seed in recipe.seeds}
    rows["runs"] = {}
    for seed, runs in plans.items():
      for row, r in runs.items():
        rows["runs"].setdefault(row, {})[seed] = r.name
    rows["evals"] = {}
    for seed, runs in plans.items():
      if until == "train":
        for r in runs.values():
          runner.ensure(r)
      else:
        rows["evals"].update(evaluate_seed(runner, seed, runs))
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
