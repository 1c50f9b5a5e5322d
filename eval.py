"""Evaluate a checkpoint: `python eval.py --workdir DIR [--step N] [--datastore CORPUS] [--knn]`.

Prints a table and writes its rows to `<workdir>/eval_<split>.json`: one row per evaluation
variant of the model's family (RETRO and In-Context RALM with and without retrieval), plus
`--datastore` swapped in without retraining (`--heldout keep` lets other editions of the
validation texts into it), `--without GLOB` documents removed from the datastore (an
opt-out, beside the full datastore; `python -m retrieval.edit`), kNN-LM with
`--lam/--k/--temperature` and a lambda sweep (table and `knn_sweep.png`), `--k` retrieved
items per query, `--verify` to recompute the checksums of every cached artifact it loads,
and `--model` to evaluate the parameters as another family that fits them:

    python eval.py --workdir runs/baseline_small --model incontext --k 1 \
        --config.model.incontext.stride=32

Every row also gets a table of perplexity by overlap bucket: the share of each chunk's
tokens found (by 8-gram overlap) in the RETRO neighbours that predict it, for any family
(`training.overlap_eval`); `--max-overlap 0.125` scores only chunks of at most that overlap
(the RETRO paper's filtered evaluation), `--no-overlap` skips it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import configs
import ml_collections
import models
from common import cli
from common import artifacts
from common.artifacts import atomic_write_text
from common.errors import UserError, cli_main
from retrieval import build, edit
from training import bundle
from training.checkpoint import restore_meta
from training.evaluation import evaluate, format_table
from training.overlap_eval import check_max_overlap, format_buckets, json_ready

__all__ = ["evaluate", "main"]


@cli_main
def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = cli.parser("Validation perplexity of a checkpoint.", config_required=False,
                 checkpoint_overrides=True)
  p.add_argument("--workdir", default="runs/retro_small",
                 help="run directory written by train.py (default runs/retro_small, where "
                      "`python train.py --config retro_small` trains), or a run bundle "
                      "(python -m training.export): a folder, gs://..., hf://org/name")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--split", default="validation", help="validation (default) or train")
  p.add_argument("--model", default=None,
                 help="evaluate the parameters as this model family (e.g. incontext for a "
                      "baseline checkpoint); --config.x=y overrides its fields")
  p.add_argument("--datastore", default=None,
                 help="corpus whose chunks replace the datastore (e.g. shakespeare_folio)")
  p.add_argument("--heldout", choices=("drop", "keep"), default=None,
                 help="drop (or keep: leakage) datastore documents named like a "
                      "validation document (default: as trained)")
  p.add_argument("--without", action="append", default=[],
                 help="also evaluate with these datastore documents removed, no retraining "
                      "(an id, a glob such as 'milton/*', or @FILE of them; repeatable), "
                      "beside the full datastore (python -m retrieval.edit)")
  p.add_argument("--knn", action="store_true", help="kNN-LM: interpolate with a datastore")
  p.add_argument("--lam", type=float, default=None, help="kNN-LM interpolation weight")
  p.add_argument("--k", type=int, default=None,
                 help="kNN-LM neighbours; otherwise the retrieved items read per query "
                      "(REALM candidates, RETRO / In-Context documents)")
  p.add_argument("--temperature", type=float, default=None, help="kNN-LM softmax temperature")
  p.add_argument("--exact", action="store_true", help="kNN-LM: report exact-distance numbers")
  p.add_argument("--batches", type=int, default=None, help="evaluate only N batches")
  p.add_argument("--max-overlap", type=float, default=None,
                 help="score only chunks whose 8-gram overlap with the RETRO neighbours they "
                      "are predicted from is at most this (in [0, 1], e.g. 0.125)")
  p.add_argument("--no-overlap", action="store_true",
                 help="skip the overlap buckets (no RETRO neighbours are built or read)")
  p.add_argument("--verify", action="store_true",
                 help="recompute the checksums of every cached artifact it loads (every load "
                      "checks sizes and .npy headers)")
  args, _ = cli.parse(p, argv)
  check_max_overlap(args.max_overlap)
  if args.no_overlap and args.max_overlap is not None:
    raise UserError("--max-overlap filters by overlap; drop --no-overlap")
  with artifacts.verification(full=True) if args.verify else contextlib.nullcontext():
    return _run(args)


def _run(args) -> list[dict]:
  args.workdir = str(bundle.local(args.workdir))  # a bundle on gs:// or the Hub: a local copy
  config = configs.from_json(restore_meta(args.workdir, args.step)["config"])
  name = config.model.name = args.model or config.model.name
  family = models.get_family(name)
  knn = None
  if family.knn_key and (args.knn or family.knn_default):
    knn = {"lam": args.lam, "k": args.k, "temperature": args.temperature,
           "exact": args.exact or None}
  common = dict(split=args.split, step=args.step, batches=args.batches, model=args.model,
                overrides=args.overrides, k=None if knn else args.k,
                max_overlap=args.max_overlap, overlap=not args.no_overlap)
  results = []
  for i, variant in enumerate(family.eval_variants):
    with_knn = knn if i == 0 else None
    r = evaluate(args.workdir, retrieval=not variant.drop, knn=with_knn,
                 write=with_knn is not None, **common)  # writes the lambda-sweep PNG
    label = ", ".join(filter(None, (name, variant.label, f"k={r['k']}" if args.k and "k" in r
                                    else "")))
    results.append({**r, "variant": label})
  if args.datastore or args.heldout:
    drop = None if args.heldout is None else args.heldout == "drop"
    r = evaluate(args.workdir, datastore=args.datastore, drop_heldout=drop, write=False, **common)
    held = f", held-out editions {args.heldout}" if args.heldout else ""
    results.append({**r, "variant": f"{name}, datastore {r['datastore']}{held}"})
  if args.without:
    results += _without_rows(args, config, knn, common)
  print(format_table(results))
  if not args.no_overlap:
    print(format_buckets(results))
  out = Path(args.workdir) / f"eval_{args.split}.json"
  atomic_write_text(out, json.dumps([json_ready(r) for r in results], indent=2))
  print(f"wrote {out}")
  return results


def _without_rows(args, config: ml_collections.ConfigDict, knn: dict | None, common: dict
                  ) -> list[dict]:
  """The opt-out rows: the full editable datastore, then without `args.without`."""
  name = config.model.name
  rows = []
  drop = None if args.heldout is None else args.heldout == "drop"
  if build.retrieval_request(config) is not None:  # the full datastore, packed by document
    full = args.datastore or edit.parent_spec(config)
    r = evaluate(args.workdir, datastore=full, drop_heldout=drop, write=False, **common)
    rows.append({**r, "variant": f"{name}, datastore {full} (full, version "
                                 f"{r['datastore_version']})"})
  else:
    full = None
  r = evaluate(args.workdir, datastore=full, drop_heldout=drop, knn=knn, without=args.without,
               write=False, **common)
  version = f", version {r['datastore_version']}" if "datastore_version" in r else ""
  rows.append({**r, "variant": f"{name}, without {' '.join(args.without)}{version}"})
  return rows


if __name__ == "__main__":
  main()
