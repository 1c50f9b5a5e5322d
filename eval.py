"""Evaluate a checkpoint: `python eval.py --workdir DIR [--step N] [--datastore CORPUS] [--knn]`.

Prints a table and writes its rows to `<workdir>/eval_<split>.json`. RETRO is evaluated with and
without retrieval (and with `--datastore` swapped in without retraining, `--heldout keep` to
let other editions of the validation texts into it); kNN-LM with
`--lam/--k/--temperature` plus a lambda sweep (table and `knn_sweep.png`); REALM at `--k`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import configs
from common import cli
from common.artifacts import atomic_write_text
from common.errors import cli_main
from training.checkpoint import restore_meta
from training.evaluation import evaluate, format_table

__all__ = ["evaluate", "main"]


@cli_main
def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = cli.parser("Validation perplexity of a checkpoint.", config_required=False)
  p.add_argument("--workdir", default="runs/retro_small",
                 help="run directory written by train.py (default runs/retro_small, where "
                      "`python train.py --config retro_small` trains)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--split", default="validation", help="validation (default) or train")
  p.add_argument("--datastore", default=None,
                 help="RETRO: corpus whose chunks replace the datastore (e.g. shakespeare_folio)")
  p.add_argument("--heldout", choices=("drop", "keep"), default=None,
                 help="RETRO: drop (or keep: leakage) datastore documents named like a "
                      "validation document (default: as trained)")
  p.add_argument("--knn", action="store_true", help="kNN-LM: interpolate with a datastore")
  p.add_argument("--lam", type=float, default=None, help="kNN-LM interpolation weight")
  p.add_argument("--k", type=int, default=None, help="kNN-LM neighbours / REALM candidates")
  p.add_argument("--temperature", type=float, default=None, help="kNN-LM softmax temperature")
  p.add_argument("--exact", action="store_true", help="kNN-LM: report exact-distance numbers")
  p.add_argument("--batches", type=int, default=None, help="evaluate only N batches")
  args, _ = cli.parse(p, argv)
  common = dict(split=args.split, step=args.step, batches=args.batches, write=False)
  model = configs.from_json(restore_meta(args.workdir, args.step)["config"]).model.name
  results = []
  if model == "retro":
    for retrieval in (True, False):
      r = evaluate(args.workdir, retrieval=retrieval, **common)
      results.append({**r, "variant": f"retro, retrieval {'on' if retrieval else 'off'}"})
    if args.datastore or args.heldout:
      drop = None if args.heldout is None else args.heldout == "drop"
      r = evaluate(args.workdir, datastore=args.datastore, drop_heldout=drop, **common)
      held = f", held-out editions {args.heldout}" if args.heldout else ""
      results.append({**r, "variant": f"retro, datastore {r['datastore']}{held}"})
  elif model == "realm":
    r = evaluate(args.workdir, realm_k=args.k, **common)
    results.append({**r, "variant": f"realm, k={r['realm_k']}"})
  else:
    knn = None
    if args.knn or model == "knnlm":
      knn = {"lam": args.lam, "k": args.k, "temperature": args.temperature,
             "exact": args.exact or None}
    r = evaluate(args.workdir, knn=knn, **{**common, "write": True})  # + the lambda-sweep PNG
    results.append({**r, "variant": model})
  print(format_table(results))
  out = Path(args.workdir) / f"eval_{args.split}.json"
  atomic_write_text(out, json.dumps(results, indent=2))
  print(f"wrote {out}")
  return results


if __name__ == "__main__":
  main()
