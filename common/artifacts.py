"""Cache locations, content hashes, manifests, and atomic (resumable) artifact writes.

Every artifact directory holds a `manifest.json`: what built it, the hashes of its inputs,
shapes/dtypes, and library versions. A consumer calls `check_manifest` with the input
hashes it expects and gets one-line `UserError` naming the stale artifact on mismatch.

Builds write into `<final>.partial/` (shards there are written atomically, so an
interrupted build resumes from its last completed shard) and `commit_dir` renames the
finished directory into place; nothing without a manifest is ever trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from common.errors import UserError

MANIFEST = "manifest.json"
_VERSIONED = ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
              "faiss-cpu", "tensorflow-datasets", "numpy")


def cache_root(cache_dir: str = "") -> Path:
  """`cache_dir` if set, else $RETROZOO_CACHE, else ~/.cache/retrozoo."""
  root = cache_dir or os.environ.get("RETROZOO_CACHE") or "~/.cache/retrozoo"
  path = Path(root).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def fingerprint(obj: Any) -> str:
  """Stable 16-hex-digit hash of a JSON-serialisable object."""
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
  """Full sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(bufsize):
      h.update(block)
  return h.hexdigest()


def library_versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def write_manifest(directory: str | os.PathLike, kind: str, inputs: Mapping[str, str],
                   **extra: Any) -> dict:
  """Writes `manifest.json` (atomically) and returns it.

  Args:
    directory: the artifact directory.
    kind: what the artifact is ("tokenizer", "dataset", "embeddings", "index", ...).
    inputs: name -> hash of every input this artifact depends on.
    **extra: shapes, dtypes, counts, the artifact's own `hash`, anything useful.
  """
  manifest = {"kind": kind, "inputs": dict(inputs), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": library_versions(), **extra}
  atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, default=str))
  return manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
  """The manifest of a committed artifact directory, or None if absent."""
  path = Path(directory) / MANIFEST
  if not path.exists():
    return None
  return json.loads(path.read_text())


def check_manifest(directory: str | os.PathLike, expected: Mapping[str, str],
                   rebuild_hint: str) -> dict:
  """Returns the manifest if every expected input hash matches; else one-line UserError."""
  manifest = read_manifest(directory)
  if manifest is None:
    raise UserError(f"{directory} has no {MANIFEST} (incomplete or foreign artifact); "
                    f"{rebuild_hint}")
  inputs = manifest.get("inputs", {})
  for name, want in expected.items():
    got = inputs.get(name)
    if got != want:
      raise UserError(f"stale {manifest.get('kind', 'artifact')} at {directory}: it was built "
                      f"with {name}={got}, this run uses {name}={want}; {rebuild_hint}")
  return manifest


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """np.save to a temporary name, then rename: a reader never sees half an array."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
  np.save(tmp, array)
  os.replace(tmp, path)


def partial_dir(final: str | os.PathLike) -> Path:
  """The persistent work directory of an unfinished build (kept across interruptions)."""
  final = Path(final)
  part = final.with_name(final.name + ".partial")
  part.mkdir(parents=True, exist_ok=True)
  return part


def commit_dir(partial: str | os.PathLike, final: str | os.PathLike) -> Path:
  """Renames a finished build directory (with its manifest) into place."""
  partial, final = Path(partial), Path(final)
  if read_manifest(partial) is None:
    raise RuntimeError(f"refusing to commit {partial}: no {MANIFEST}")
  if final.exists():
    shutil.rmtree(final)
  os.replace(partial, final)
  return final


@contextlib.contextmanager
def building(final: str | os.PathLike) -> Iterator[Path]:
  """`with building(final) as work:` write shards into `work`, write the manifest, done.

  On normal exit the directory is committed to `final`; on error `work` stays as
  `<final>.partial` so a rerun can resume from the shards already written.
  """
  work = partial_dir(final)
  yield work
  commit_dir(work, final)
