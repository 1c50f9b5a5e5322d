"""Command-line parsing shared by train.py, eval.py and the retrieval CLIs.

    python train.py --config retro_small --workdir runs/x --config.train.steps=10
"""

from __future__ import annotations

import argparse
from typing import Sequence

import ml_collections

import configs
from common.errors import UserError


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse's own errors become one-line UserErrors
    raise UserError(f"{message} (see --help)")


def parser(description: str, *, config_required: bool = True,
           checkpoint_overrides: bool = False) -> argparse.ArgumentParser:
  """An ArgumentParser that already takes `--config NAME`; add your own flags to it.

  With `checkpoint_overrides`, `--config.x=y` without `--config` is allowed: the overrides
  are left in `args.overrides` for the caller to apply to a checkpoint's own config.
  """
  p = _Parser(description=description,
              epilog="Override any config field with --config.section.field=value.")
  p.set_defaults(checkpoint_overrides=checkpoint_overrides)
  p.add_argument("--config", required=config_required,
                 help=f"named config, one of: {', '.join(configs.names())}")
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None
          ) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
  """Parses flags; returns (args, config with overrides) — config None without --config."""
  args, rest = p.parse_known_args(argv)
  overrides = []
  i = 0
  while i < len(rest):
    token = rest[i]
    if not token.startswith("--config."):
      raise UserError(f"unrecognised argument {token!r} (see --help)")
    if "=" not in token and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
      token = f"{token}={rest[i + 1]}"
      i += 1
    overrides.append(token)
    i += 1
  args.overrides = overrides
  if args.config is None:
    if overrides and not args.checkpoint_overrides:
      raise UserError("--config.* overrides need --config NAME")
    return args, None
  return args, configs.load(args.config, overrides)
