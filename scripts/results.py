"""Reproducible results table: `python scripts/results.py [--quick] [--out results]`.

Trains baseline_small, retro_small and realm_small (frozen and refreshed index) on the
default corpus with the same decoder, tokens and seed; evaluates on the held-out plays:
- baseline vs RETRO with retrieval vs the same RETRO checkpoint without retrieval;
- RETRO with the First Folio datastore (which also holds the held-out plays: leakage);
- kNN-LM on the baseline checkpoint: lambda sweep, exact vs approximate distances;
- REALM reader: k=1 vs k=4 marginal; frozen vs refreshed index.
Writes `<out>/RESULTS.md`, `<out>/results.json` and `<out>/perplexity.png`. Runs resume:
rerunning continues from the checkpoints already in `<out>/runs/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import configs  # noqa: E402
from common.errors import cli_main  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.loop import train_and_evaluate  # noqa: E402

RUNS = {  # run name -> (config, overrides)
    "baseline": ("baseline_small", []),
    "retro": ("retro_small", []),
    "realm_frozen": ("realm_small", ["retrieval.refresh_every=0"]),
    "realm_refreshed": ("realm_small", []),
}
QUICK = ["train.steps=40", "train.warmup_steps=5", "train.eval_every=1000",
         "train.checkpoint_every=1000", "eval.batches=4"]


def run_all(out: Path, quick: bool, steps: int | None) -> dict[str, Any]:
  """Trains (or resumes) every run and evaluates every variant; returns the rows."""
  extra = list(QUICK) if quick else []
  if steps:
    extra.append(f"train.steps={steps}")
  rows: dict[str, Any] = {}
  for run, (name, overrides) in RUNS.items():
    cfg = configs.load(name, [*overrides, *extra])
    train_and_evaluate(cfg, str(out / "runs" / run))
  runs = out / "runs"
  batches = 4 if quick else None
  rows["baseline"] = evaluate(runs / "baseline", batches=batches)
  rows["retro"] = evaluate(runs / "retro", batches=batches)
  rows["retro_off"] = evaluate(runs / "retro", retrieval=False, batches=batches)
  rows["retro_folio"] = evaluate(runs / "retro", datastore="shakespeare_folio", batches=batches)
  rows["knnlm"] = evaluate(runs / "baseline", knn=True, batches=batches)
  for run in ("realm_frozen", "realm_refreshed"):
    for k in (1, 4):
      rows[f"{run}_k{k}"] = evaluate(runs / run, realm_k=k, batches=batches)
  return rows


def table(rows: dict[str, Any]) -> str:
  """The Markdown table of RESULTS.md."""
  base = rows["baseline"]["perplexity"]
  knn = rows["knnlm"]["knn"]
  lines = ["| model | validation perplexity | vs baseline |", "|---|---|---|"]

  def add(label: str, ppl: float) -> None:
    lines.append(f"| {label} | {ppl:.2f} | {100 * (ppl / base - 1):+.1f}% |")

  add("baseline decoder", base)
  add("RETRO, retrieval on (train-split datastore)", rows["retro"]["perplexity"])
  add("RETRO, same checkpoint, retrieval off", rows["retro_off"]["perplexity"])
  add("RETRO, First Folio datastore (overlaps validation: leakage)",
      rows["retro_folio"]["perplexity"])
  add(f"kNN-LM on the baseline, λ={knn['lam']}, k={knn['k']}", knn["perplexity"])
  add(f"kNN-LM, best λ={knn['best_lam']}", knn["best_perplexity"])
  for run, label in (("realm_frozen", "frozen index"), ("realm_refreshed", "refreshed index")):
    for k in (1, 4):
      add(f"REALM reader, {label}, k={k}", rows[f"{run}_k{k}"]["perplexity"])
  lines.append("")
  lines.append("REALM perplexity covers targets after the first 64-token query chunk only.")
  lines.append("")
  lines.append("| λ | kNN-LM ppl (approximate) | kNN-LM ppl (exact distances) |")
  lines.append("|---|---|---|")
  for s in knn["sweep"]:
    lines.append(f"| {s['lam']} | {s['perplexity_approximate']:.2f} | "
                 f"{s['perplexity_exact']:.2f} |")
  return "\n".join(lines)


def plot(rows: dict[str, Any], path: Path) -> None:
  from matplotlib.figure import Figure

  labels = ["baseline", "retro", "retro_off", "retro_folio", "realm_frozen_k4",
            "realm_refreshed_k4"]
  values = [rows[k]["perplexity"] for k in labels] + [rows["knnlm"]["knn"]["best_perplexity"]]
  labels = labels + ["knnlm (best λ)"]
  fig = Figure(figsize=(8, 4), dpi=100)
  ax = fig.add_subplot()
  ax.bar(range(len(values)), values, color="tab:blue")
  ax.set_xticks(range(len(values)), labels, rotation=30, ha="right")
  ax.set_ylabel("validation perplexity")
  ax.set_title("Held-out Shakespeare plays")
  fig.tight_layout()
  fig.savefig(path)


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results", help="output folder (default results/)")
  p.add_argument("--quick", action="store_true", help="40 steps, 4 eval batches (smoke run)")
  p.add_argument("--steps", type=int, default=None, help="override train.steps for every run")
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = run_all(out, args.quick, args.steps)
  (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
  md = table(rows)
  (out / "RESULTS.md").write_text("# Results\n\n" + md + "\n")
  plot(rows, out / "perplexity.png")
  print(md)
  return rows


if __name__ == "__main__":
  main()
