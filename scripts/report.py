"""RESULTS.md and the plots of the results protocol (scripts/results.py), from its rows.

Every number is a mean over seeds with its spread (sample standard deviation and range); a
difference is called a finding only when it exceeds the spread of both sides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval import overlap

# Report rows: (label, evaluation row, the row it is compared with).
ROWS = (
    ("baseline (tuned learning rate)", "base", "base"),
    ("baseline continued for the extra steps", "cont", "base"),
    ("the better of the two baselines per seed (reference of the rows below it)", "best",
     "best"),
    ("RETRO-fitted baseline, Folio datastore with the held-out plays' Folio editions",
     "fit_related", "best"),
    ("RETRO-fitted baseline, Folio datastore without them (no related text)", "fit_unrelated",
     "best"),
    ("RETRO-fitted baseline, retrieval off (its baseline)", "fit_off", "best"),
    ("REALM reader from the baseline, frozen index, k=1 (+ null document)", "realm_k1", "best"),
    ("REALM reader from the baseline, frozen index, k=4 (+ null document)", "realm_k4", "best"),
    ("REALM reader, refreshed index, k=1 (seed 0)", "realm_refreshed_k1", "best"),
    ("REALM reader, refreshed index, k=4 (seed 0)", "realm_refreshed_k4", "best"),
    ("RETRO from scratch, training-split datastore", "retro", "base"),
    ("RETRO from scratch, same checkpoints, retrieval off", "retro_off", "base"),
    ("kNN-LM on the baseline (λ and T chosen on validation)", "knn", "base"),
)


def with_best_baseline(evals: dict[str, Any]) -> dict[str, Any]:
  """`evals` plus rows "best/<seed>/<split>": per seed and split, whichever of the baseline
  ("base") and the baseline continued for the extra steps ("cont") has the lower perplexity.
  Re-warming a trained baseline's learning rate can leave it worse than where it started, so
  the rows trained from the baseline (RETRO-fitting, REALM) are held against the better of
  the two: the conservative reference (it favours the baseline)."""
  out = dict(evals)
  for key, value in evals.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "cont":
      base = evals.get(f"base/{parts[1]}/{parts[2]}")
      if base is not None:
        better = min((value, "cont"), (base, "base"), key=lambda v: v[0]["perplexity"])
        out[f"best/{parts[1]}/{parts[2]}"] = {**better[0], "from": better[1]}
  return out


def stats(values: Sequence[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def seeds_of(evals: dict[str, Any], row: str, split: str) -> dict[int, float]:
  out = {}
  for key, value in evals.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == row and parts[2] == split:
      out[int(parts[1])] = value["perplexity"]
  return out


def change(evals: dict[str, Any], row: str, ref: str, split: str) -> dict[str, float] | None:
  """Per-seed % change of perplexity against `ref` of the same seed, with its stats."""
  a, b = seeds_of(evals, row, split), seeds_of(evals, ref, split)
  common = sorted(set(a) & set(b))
  if not common:
    return None
  return stats([100.0 * (a[s] / b[s] - 1.0) for s in common])


def fmt(st: dict[str, float] | None, digits: int = 2, unit: str = "") -> str:
  if st is None:
    return "—"
  spread = f" ± {st['std']:.{digits}f}" if st["n"] > 1 else ""
  return f"{st['mean']:+.{digits}f}{unit}{spread}" if unit else \
      f"{st['mean']:.{digits}f}{spread} (n={st['n']})"


MIN_SEEDS = 3  # a target is called met or not only with this many seeds


def _decide(*stats_and_test: Any) -> bool | None:
  """test(*stats) when every stats has MIN_SEEDS seeds; None (undecided) otherwise."""
  *sts, test = stats_and_test
  if any(st is None or st["n"] < MIN_SEEDS for st in sts):
    return None
  return bool(test(*sts))


def targets(evals: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
  """(target, measured, met) on the test split; None = not decided (fewer than MIN_SEEDS
  seeds measured). "Beyond the spread": the mean change plus (or minus) one std."""
  evals = with_best_baseline(evals)
  fit = change(evals, "fit_related", "best", "test")
  retro = change(evals, "retro", "base", "test")
  k1, k4 = (change(evals, f"realm_k{k}", "best", "test") for k in (1, 4))
  k4_vs_k1 = change(evals, "realm_k4", "realm_k1", "test")
  knn = change(evals, "knn", "base", "test")
  return [
      ("RETRO-fitted baseline with a related datastore (the held-out plays' Folio editions): "
       ">= 10% lower perplexity than the baseline", fmt(fit, unit="%"),
       _decide(fit, lambda f: f["mean"] + f["std"] <= -10.0)),
      ("RETRO with the training-split datastore not worse than the baseline beyond seed "
       "spread", fmt(retro, unit="%"), _decide(retro, lambda r: r["mean"] - r["std"] <= 0.0)),
      ("REALM: k=4 marginal better than k=1 beyond seed spread", fmt(k4_vs_k1, unit="%"),
       _decide(k4_vs_k1, lambda d: d["mean"] + d["std"] < 0.0)),
      ("REALM: k=1 and k=4 both better than the baseline they start from, beyond seed spread",
       f"k=1 {fmt(k1, unit='%')}, k=4 {fmt(k4, unit='%')}",
       _decide(k1, k4, lambda a, b: max(a["mean"] + a["std"], b["mean"] + b["std"]) < 0.0)),
      ("kNN-LM >= 10% lower perplexity than its base LM on test (λ, T from validation)",
       fmt(knn, unit="%"), _decide(knn, lambda k: k["mean"] + k["std"] <= -10.0)),
  ]


# Overlap comparisons: (label, row, reference row); chunks are bucketed by the row's own
# neighbours' 8-gram overlap and both models are scored on exactly those chunks.
OVERLAP_PAIRS = (
    ("RETRO-fitted, related Folio datastore vs the better baseline", "fit_related", "best"),
    ("RETRO-fitted, Folio without the held-out editions vs the better baseline",
     "fit_unrelated", "best"),
    ("RETRO (training-split datastore) vs the baseline", "retro", "base"),
)


def overlap_gain(evals_dir: Path, row: str, ref: str, split: str, seeds: Sequence[int],
                 evals: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
  """Per overlap bucket: chunks, tokens and the % change of perplexity of `row` against
  `ref` on the same chunks (mean and std over seeds), from the evaluations' chunk scores
  (ref "best": the run `with_best_baseline` picked for the seed, from `evals`)."""
  per_seed = []
  for seed in seeds:
    name = ref
    if ref == "best":
      name = (evals or {}).get(f"best/{seed}/{split}", {}).get("from", "base")
    paths = [evals_dir / f"{n}__{seed}__{split}.npz" for n in (row, name)]
    if not all(p.exists() for p in paths):
      continue
    a, b = (np.load(p) for p in paths)
    if not np.array_equal(a["sequence_S"], b["sequence_S"]):
      raise ValueError(f"{row} and {ref} (seed {seed}) scored different sequences")
    bucket_SxU = overlap.bucket_of(a["overlap_SxU"])
    gains = []
    for g in range(len(overlap.BUCKETS)):
      sel = (bucket_SxU == g) & (a["tokens_SxU"] > 0)
      tokens = float(a["tokens_SxU"][sel].sum())
      ppl = [math.exp(-float(x["logprob_SxU"][sel].sum()) / tokens) if tokens else math.nan
             for x in (a, b)]
      gains.append((int(sel.sum()), tokens, 100.0 * (ppl[0] / ppl[1] - 1.0)))
    per_seed.append(gains)
  if not per_seed:
    return None
  out = []
  for g, name in enumerate(overlap.BUCKETS):
    changes = [seed[g][2] for seed in per_seed if not math.isnan(seed[g][2])]
    out.append({"bucket": name, "chunks": per_seed[0][g][0], "tokens": per_seed[0][g][1],
                "change": stats(changes) if changes else None})
  return out


def _chosen(sweep: dict[str, Any], key: str, unit: str) -> str:
  if not sweep.get("perplexity") or sweep.get("partial"):
    return "(sweep not finished)"
  return f"{sweep[key]:g}{unit}"


def _swept(sweep: dict[str, Any], unit: str) -> str:
  return ", ".join(f"{x}{unit}: {p:.2f}" for x, p in sweep.get("perplexity", {}).items()) or \
      "pending"


def markdown(rows: dict[str, Any], evals_dir: Path | None = None) -> str:
  r, evals = rows["recipe"], with_best_baseline(rows.get("evals", {}))
  sweep = rows["sweep"]
  lines = [
      "# Results", "",
      f"Recipe: baseline and RETRO from scratch {r['steps']} steps; the continued baseline, "
      f"RETRO-fitting and REALM {r['extra_steps']} more steps from the baseline's checkpoint; "
      f"learning rate {_chosen(sweep, 'learning_rate', '')} (swept on the baseline: "
      f"{_swept(sweep, '')} validation perplexity), warmup 10%, cosine to 0.1x; RETRO-fitting "
      f"(only the encoder and the cross-attention train; smeared keys, a copy curriculum for "
      f"the first half, 25% distractors: results/copy) at "
      f"{_chosen(rows.get('fit_sweep', {}), 'scale', 'x')} that rate (swept on validation: "
      f"{_swept(rows.get('fit_sweep', {}), 'x')}); the continued baseline and REALM's reader at "
      f"{_chosen(rows.get('warm_sweep', {}), 'scale', 'x')} (swept on the continued baseline: "
      f"{_swept(rows.get('warm_sweep', {}), 'x')}); seeds {tuple(r['seeds'])}; "
      f"every model scored on the same target tokens (those after the first "
      f"{r['score_from'] + 1} tokens of each 512-token sequence); hyperparameters chosen on "
      f"validation, numbers on the test split (held-out documents). Mean ± sample standard "
      f"deviation over seeds.", "",
      "| model | test perplexity | vs its reference (per seed, %) | validation perplexity |",
      "|---|---|---|---|"]
  for label, row, ref in ROWS:
    test = seeds_of(evals, row, "test")
    if not test:
      continue
    val = seeds_of(evals, row, "validation")
    vs = "reference" if row == ref else fmt(change(evals, row, ref, "test"), unit="%")
    lines.append(f"| {label} | {fmt(stats(list(test.values())))} | {vs} | "
                 f"{fmt(stats(list(val.values()))) if val else '—'} |")
  done = rows.get("progress")
  if done and not rows.get("complete"):
    lines += ["", f"**Run in progress** (`python scripts/results.py` resumes it): "
              f"{len(done['finished'])} training runs finished, {len(done['unfinished'])} "
              f"started and unfinished ({', '.join(done['unfinished']) or 'none'}), "
              f"{len(done['evaluations'])} evaluations cached. Rows without numbers are not "
              f"measured yet."]
  lines += ["", "## Targets (test split)", "", "| target | measured (mean ± std over seeds) | met |",
            "|---|---|---|"]
  for name, measured, met in targets(evals):
    verdict = f"— (fewer than {MIN_SEEDS} seeds)" if met is None else "yes" if met else "no"
    lines.append(f"| {name} | {measured} | {verdict} |")
  knn = [v for k, v in evals.items() if k.startswith("knn/") and k.endswith("/test")]
  if knn:
    lines += ["", "kNN-LM settings chosen on validation, per seed: " + ", ".join(
        f"λ={v['lam']}, T={v['temperature']:g}" for v in knn) + "."]
  leak = rows.get("leakage")
  if leak:
    lines += ["", "## Datastores against the test split", "",
              "| datastore | shared document ids | test chunks held verbatim |", "|---|---|---|"]
    for name, v in leak.items():
      lines.append(f"| {name} | {len(v['shared_doc_ids'])} | {v['verbatim_chunks']} of "
                   f"{v['chunks']} |")
  gains = overlap_tables(rows, evals_dir)
  if gains:
    lines += ["", "## Where the gain comes from: test chunks by 8-gram overlap with their "
              "neighbours", "",
              "Chunks are bucketed by the share of their tokens inside an 8-gram that also "
              "occurs in the neighbours they are predicted from (the RETRO paper's leakage "
              "analysis; `eval.py --max-overlap` scores only the chunks at or below a "
              "threshold). Change of perplexity against the reference on the same chunks, "
              "mean ± std over seeds:", "",
              "| comparison | " + " | ".join(overlap.BUCKETS) + " |",
              "|---|" + "---|" * len(overlap.BUCKETS)]
    for label, table in gains.items():
      lines.append(f"| {label} | " + " | ".join(
          f"{fmt(b['change'], unit='%')} ({b['chunks']} chunks)" for b in table) + " |")
  lines += ["", "Plots: `curves.png` (validation perplexity over training tokens, seed bands; "
            "retrieval on vs off over RETRO-fitting and RETRO training), `overlap_gain.png`, "
            "`knn_sweep.png`."]
  return "\n".join(lines)


def overlap_tables(rows: dict[str, Any], evals_dir: Path | None
                   ) -> dict[str, list[dict[str, Any]]]:
  if evals_dir is None:
    return {}
  seeds = rows["recipe"]["seeds"]
  evals = with_best_baseline(rows.get("evals", {}))
  tables = {label: overlap_gain(evals_dir, row, ref, "test", seeds, evals)
            for label, row, ref in OVERLAP_PAIRS}
  return {label: t for label, t in tables.items() if t}


def _eval_curve(logs: Path, run_names: dict[str, str], offset: int, tokens_per_step: int
                ) -> dict[int, list[tuple[int, float]]]:
  """seed -> [(training tokens, validation perplexity)] from the runs' kept logs."""
  out = {}
  for seed, name in run_names.items():
    path = logs / f"{name}.jsonl"
    if not path.exists():
      continue
    points = [(offset + rec["step"] * tokens_per_step, rec["eval/perplexity"])
              for rec in map(json.loads, path.read_text().splitlines())
              if "eval/perplexity" in rec]
    out[int(seed)] = points
  return out


def plots(rows: dict[str, Any], out: Path, tokens_per_step: int = 8 * 512) -> None:
  """curves.png: validation perplexity vs training tokens (mean, min-max band over seeds)
  and retrieval on vs off over training; knn_sweep.png: the lambda sweeps on validation."""
  from matplotlib.figure import Figure

  r, runs, evals = rows["recipe"], rows.get("runs", {}), rows.get("evals", {})
  fig = Figure(figsize=(13, 4.5), dpi=100)
  ax, ax2 = fig.subplots(1, 2)
  base_tokens = r["steps"] * tokens_per_step
  for run, label in (("base", "baseline"), ("retro", "RETRO"), ("cont", "baseline continued"),
                     ("fit", "RETRO-fitted (own datastore)"), ("realm", "REALM k=4")):
    offset = base_tokens if run in ("cont", "fit", "realm") else 0
    curves = _eval_curve(out / "logs", runs.get(run, {}), offset, tokens_per_step)
    if not curves:
      continue
    n = min(len(c) for c in curves.values())
    x = [p[0] for p in next(iter(curves.values()))[:n]]
    y = np.asarray([[p[1] for p in c[:n]] for c in curves.values()])
    ax.plot(x, y.mean(0), marker="o", label=f"{label} (n={len(y)})")
    ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation perplexity (eval batches of the run)")
  ax.set_yscale("log")
  ax.set_title("Validation perplexity over training (band: seeds' range)")
  for run, label in (("fit", "RETRO-fitting, related Folio datastore"), ("retro", "RETRO")):
    for mode, style in (("on", "-"), ("off", "--")):
      pts = sorted((int(k.split("/")[1]), v["perplexity"]) for k, v in evals.items()
                   if k.startswith(f"curve_{run}_{mode}/"))
      if pts:
        ax2.plot(*zip(*pts), style, marker="o", label=f"{label}: retrieval {mode}")
  ax2.set_xlabel("step of the run")
  ax2.set_ylabel("validation perplexity")
  ax2.set_title("Retrieval on vs off over training (seed 0)")
  for a in (ax, ax2):
    if a.get_legend_handles_labels()[0]:
      a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "curves.png")
  sweeps = [v for k, v in evals.items() if k.startswith("knn/") and k.endswith("/validation")]
  if sweeps:
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for t, sweep in sweeps[0]["sweeps"].items():
      pts = [(s["lam"], s["perplexity_approximate"]) for s in sweep["sweep"]
             if math.isfinite(s["perplexity_approximate"])]
      ax.plot(*zip(*pts), marker="o", label=f"T={float(t):g}")
    ax.set_xlabel("λ")
    ax.set_ylabel("validation perplexity")
    ax.set_title("kNN-LM interpolation (seed 0's baseline)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "knn_sweep.png")


def plot_overlap(gains: dict[str, list[dict[str, Any]]], path: Path) -> None:
  """% change of perplexity against the reference per overlap bucket (error bars: std)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 4.5), dpi=100)
  ax = fig.subplots()
  x = np.arange(len(overlap.BUCKETS))
  for label, table in gains.items():
    pts = [(i, b["change"]["mean"], b["change"]["std"]) for i, b in enumerate(table)
           if b["change"] is not None]
    if pts:
      i, mean, std = zip(*pts)
      ax.errorbar(i, mean, yerr=std, marker="o", capsize=3, label=label)
  ax.axhline(0.0, color="grey", lw=0.8)
  ax.set_xticks(x, overlap.BUCKETS)
  ax.set_xlabel("8-gram overlap of a test chunk with its neighbours")
  ax.set_ylabel("perplexity change vs reference (%)")
  ax.set_title("Gain over the baseline against neighbour overlap (test)")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)


def write(rows: dict[str, Any], out: Path, evals_dir: Path | None = None) -> str:
  md = markdown(rows, evals_dir)
  (out / "RESULTS.md").write_text(md + "\n")
  plots(rows, out)
  gains = overlap_tables(rows, evals_dir)
  if gains:
    plot_overlap(gains, out / "overlap_gain.png")
  return md
