"""Training curves of several runs in one plot:
`python scripts/compare_runs.py --out curves.png [--metric train/loss] LABEL=WORKDIR ...`.

Reads each workdir's metrics.jsonl (what train.py logs) and draws `metric` against the step,
averaged over windows of `--smooth` logged points, so recipes can be compared by eye.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def curve(workdir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `metric` in `workdir/metrics.jsonl`."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  points = sorted((r["step"], r[metric]) for r in rows if metric in r)
  if not points:
    raise SystemExit(f"{workdir}/metrics.jsonl has no {metric!r}")
  steps, values = np.asarray(points, np.float64).T
  return steps, values


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="LABEL=WORKDIR")
  p.add_argument("--metric", default="train/loss")
  p.add_argument("--smooth", type=int, default=5, help="logged points per averaged window")
  p.add_argument("--title", default="")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  for run in args.runs:
    label, _, workdir = run.partition("=")
    steps, values = curve(Path(workdir), args.metric)
    n = len(values) // args.smooth * args.smooth
    ax.plot(steps[:n].reshape(-1, args.smooth).mean(1),
            values[:n].reshape(-1, args.smooth).mean(1), label=label)
  ax.set_xlabel("step")
  ax.set_ylabel(args.metric)
  ax.set_title(args.title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
