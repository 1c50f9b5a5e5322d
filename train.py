"""Train a retrieval-augmented LM: `python train.py --config NAME [--workdir DIR] [--config.x=y]`.

Builds missing artifacts (data, tokenizer, embeddings, index, neighbours), trains with
one jitted step, checkpoints with orbax and resumes from the latest checkpoint in the
workdir (`--verify`: recompute every loaded artifact's checksums). SIGTERM or Ctrl-C saves a checkpoint of the current step and exits 0; rerunning
the same command resumes exactly (docs/RELIABILITY.md). The loop lives in `training.loop`;
this file is the thin entry point.
"""

from __future__ import annotations

import contextlib
import json
from typing import Sequence

from common import artifacts, cli
from common.errors import cli_main
from training.checkpoint import load_checkpoint
from training.loop import train_and_evaluate

__all__ = ["train_and_evaluate", "load_checkpoint", "main"]


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
  p = cli.parser("Train a retrieval-augmented language model.")
  p.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
  p.add_argument("--verify", action="store_true",
                 help="recompute the checksums of every cached artifact it loads (every load "
                      "checks sizes and .npy headers)")
  args, config = cli.parse(p, argv)
  workdir = args.workdir or f"runs/{config.name}"
  print(f"config {config.name} -> {workdir}\n{config}", flush=True)
  with artifacts.verification(full=True) if args.verify else contextlib.nullcontext():
    final = train_and_evaluate(config, workdir)
  print(json.dumps(final, indent=2))
  return final


if __name__ == "__main__":
  main()
