"""Verifies every cached artifact a config uses: each file's size, .npy header and sha256
against its manifest (every load checks only sizes and headers).

    python -m retrieval.verify --config retro_small [--config.retrieval.datastore=...]

Prints one line per artifact (corpus download, tokenizer, dataset, packed datastore, chunk
and query-window embeddings, index, neighbours or candidates, and the kNN-LM datastores
built on the config's dataset): `OK`, `UNVERIFIED` (a manifest written before file
checksums were recorded), `NOT BUILT` (what depends on it is then not checked), or
`DAMAGED`/`STALE` with the problem. The artifacts are loaded in dependency order and a
damaged or stale one stops the walk (`NOT CHECKED` for the rest: what loads after it
depends on it): rebuild it and verify again. Nothing is built or changed. Exits 2, with one
`error:` line on stderr, if an artifact is damaged or stale.

The artifacts are found by the same code that loads them for training (`build.build_all`)
run under `artifacts.verification(full=True, build=False)`, so this checks exactly what
train.py would use.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from common import artifacts
from common import cli
from common.errors import UserError, cli_main
from retrieval import build, knn_datastore


def verify(config: ml_collections.ConfigDict) -> list[tuple[str, Path, str, str]]:
  """(kind, directory, status, detail) of every artifact `config` uses, in build order;
  status: ok, unverified, damaged, stale or "not built"."""
  with artifacts.verification(full=True, build=False) as report:
    with contextlib.redirect_stdout(io.StringIO()):  # the loaders' "reusing cached ..."
      try:
        built = build.build_all(config)
      except artifacts.NotBuilt as e:
        report.append((e.final.parent.name, e.final, "not built",
                       f"{artifacts.rebuild_command(config.name)} builds it; what depends on "
                       f"it was not checked"))
        built = None
      except UserError as e:
        if not report or report[-1][3] != str(e):  # not an artifact's own problem
          raise
        report.append(("", artifacts.cache_root(config.data.cache_dir), "not checked",
                       "the artifacts loaded after it (rebuild it, then verify again)"))
        built = None
      if built is not None:
        knn_root = artifacts.cache_root(config.data.cache_dir) / knn_datastore.ARTIFACT
        dataset_hash = built.prepared.hashes["dataset"]
        for directory in sorted(knn_root.glob("*")) if knn_root.is_dir() else ():
          manifest = artifacts.read_manifest(directory)
          if manifest and manifest.get("inputs", {}).get("dataset") == dataset_hash:
            with contextlib.suppress(UserError):  # noted in the report
              artifacts.check_files(directory, manifest)
  return list(report)


def format_line(kind: str, directory: Path, status: str, detail: str) -> str:
  if status in ("damaged", "stale"):
    return f"{status.upper():<10} {detail}"
  if status == "not checked":
    return f"{status.upper():<10} {detail}"
  return f"{status.upper():<10} {kind} {directory}" + (f": {detail}" if detail else "")


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
  p = cli.parser("Verify the checksums of every cached artifact a config uses.")
  _, config = cli.parse(p, argv)
  report = verify(config)
  for line in report:
    print(format_line(*line), flush=True)
  bad = [detail for _, _, status, detail in report if status in ("damaged", "stale")]
  if bad:
    raise UserError(f"verification failed: {bad[0]}")
  print(f"{len(report)} artifacts checked")


if __name__ == "__main__":
  main(sys.argv[1:])
