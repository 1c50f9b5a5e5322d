"""Cache locations, content hashes, manifests, and atomic (resumable) artifact writes.

Every artifact directory holds a `manifest.json`: what built it, the hashes of its inputs,
shapes/dtypes, and library versions. A consumer calls `check_manifest` with the input
hashes it expects and gets one-line `UserError` naming the stale artifact on mismatch.

Builds write into `<final>.partial/` (shards there are written atomically, so an
interrupted build resumes from its last completed shard) and `commit_dir` renames the
finished directory into place; nothing without a manifest is ever trusted.

The manifest also lists every file of the artifact (`files`: path relative to the
directory -> bytes, sha256, and for .npy files dtype and shape). Every load checks the
sizes and .npy headers (`check_files`, called by `check_manifest`: a stat and a ~128-byte
read per file); `verification(full=True)` (`python -m retrieval.verify`, `--verify` on
train.py/eval.py) also recomputes the checksums. A damaged file stops the run with one line
naming the artifact, the file, what is wrong and how to rebuild it. Manifests written
before the file list existed have no `files`: they load unchecked ("unverified").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath

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


def file_sha256(path: str | os.PathLike) -> str:
  """Full sha256 hex digest of a file's bytes (~1.7 GB/s with SHA extensions)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


# --- the files an artifact describes --------------------------------------------------------

def _npy_header(path: Path) -> tuple[str, list[int], int] | None:
  """(dtype, shape, data offset) from a .npy file's header, or None if it has none."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      else:  # 3.0 (utf8 field names): no public reader
        shape, _, dtype = np.lib.format._read_array_header(f, version)
      return str(dtype), list(shape), f.tell()
  except (ValueError, OSError, SyntaxError, TypeError):
    return None


def file_record(path: str | os.PathLike, checksum: bool = True) -> dict:
  """{bytes, sha256, and for .npy files dtype and shape} of one file."""
  path = Path(path)
  record: dict[str, Any] = {"bytes": path.stat().st_size}
  if path.suffix == ".npy":
    header = _npy_header(path)
    if header is not None:
      record["dtype"], record["shape"], _ = header
  if checksum:
    record["sha256"] = file_sha256(path)
  return record


def _is_temporary(path: Path) -> bool:
  """A leftover temporary of an interrupted atomic write (`.<name>.tmp...`)."""
  return path.name.startswith(".") and ".tmp" in path.name


def files_record(directory: str | os.PathLike) -> dict[str, dict]:
  """relative path -> `file_record` of every file under `directory` but the manifest and
  leftover temporaries."""
  directory = Path(directory)
  return {p.relative_to(directory).as_posix(): file_record(p)
          for p in sorted(directory.rglob("*"))
          if p.is_file() and p.name != MANIFEST and not _is_temporary(p)}


def file_problem(path: str | os.PathLike, record: Mapping[str, Any], full: bool,
                 name: str | None = None, source: str = "its manifest") -> str | None:
  """What is wrong with `path` against its record ("<name> has 10 bytes, ..."), or None.

  The cheap check (full=False) compares the size and a .npy header's dtype and shape (and
  that the size is what the header implies); full=True also the sha256. `source`: where
  the record is kept, for the message.
  """
  path = Path(path)
  name = name or path.name
  if not path.is_file():
    return f"{name} is missing"
  size = path.stat().st_size
  if "bytes" in record and size != record["bytes"]:
    return f"{name} has {size} bytes, {source} says {record['bytes']}"
  if path.suffix == ".npy":
    header = _npy_header(path)
    if header is None:
      return f"{name} has no valid .npy header"
    dtype, shape, offset = header
    if "dtype" in record and (dtype, shape) != (record["dtype"], list(record["shape"])):
      return (f"{name} holds {dtype} {shape}, {source} says {record['dtype']} "
              f"{list(record['shape'])}")
    want = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != want:
      return f"{name} has {size} bytes, its .npy header ({dtype} {shape}) needs {want}"
  if full and "sha256" in record and file_sha256(path) != record["sha256"]:
    return f"{name} does not match the sha256 {source} records (its bytes changed)"
  return None


@dataclasses.dataclass
class _Verification:
  full: bool = False  # recompute checksums on every load, not just sizes and headers
  build: bool = True  # False: a missing artifact raises NotBuilt instead of being built
  report: list | None = None  # (kind, directory, status, detail) of every artifact checked
  checked: set = dataclasses.field(default_factory=set)  # directories fully verified


_MODE = _Verification()


class NotBuilt(Exception):
  """Raised instead of building, under `verification(build=False)`."""

  def __init__(self, final: Path):
    super().__init__(str(final))
    self.final = final


@contextlib.contextmanager
def verification(full: bool = True, build: bool = True,
                 report: list | None = None) -> Iterator[list]:
  """Within it, every artifact load recomputes the checksums of its files (full=True);
  with build=False nothing is built (`NotBuilt` is raised instead). `report` (yielded)
  collects (kind, directory, status, detail) per artifact checked, status one of "ok",
  "unverified", "damaged", "stale" (detail: the one-line message)."""
  global _MODE
  saved = _MODE
  _MODE = _Verification(full=full, build=build, report=[] if report is None else report)
  try:
    yield _MODE.report
  finally:
    _MODE = saved


def _note(kind: str, directory: Path, status: str, detail: str = "") -> None:
  if _MODE.report is not None and not any(r[1] == directory for r in _MODE.report):
    _MODE.report.append((kind, directory, status, detail))


def rebuild_command(config_name: str) -> str:
  """The command that (re)builds every cached artifact of a config but a kNN-LM datastore."""
  return f"python -m retrieval.build --config {config_name} and the same --config.* overrides"


def damaged_message(kind: str, directory: str | os.PathLike, problem: str,
                    rebuild: str = "") -> str:
  """One line: `<kind> artifact <dir> is damaged: <problem>; delete <dir> and rerun ...`."""
  return (f"{kind} artifact {directory} is damaged: {problem}; delete {directory} and rerun"
          + (f" (or: {rebuild})" if rebuild else ""))


def check_files(directory: str | os.PathLike, manifest: Mapping[str, Any] | None = None,
                rebuild: str = "", full: bool | None = None) -> dict:
  """The manifest, once every file it lists has its recorded size (and .npy dtype/shape;
  with full=True, or under `verification()`, its sha256); else one-line UserError.

  `rebuild`: the command that rebuilds the artifact once deleted, e.g.
  "python -m retrieval.build --config NAME". A manifest without `files` (written before
  they were recorded) is not checked: the artifact is "unverified".
  """
  directory = Path(directory)
  manifest = read_manifest(directory) if manifest is None else manifest
  if manifest is None:
    raise UserError(f"{directory} has no {MANIFEST} (incomplete or foreign artifact); "
                    f"delete {directory} and rerun" + (f" (or: {rebuild})" if rebuild else ""))
  kind = manifest.get("kind", "artifact")
  files = manifest.get("files")
  if files is None:
    _note(kind, directory, "unverified", "its manifest predates file checksums (delete it "
                                         "to rebuild it with them)")
    return dict(manifest)
  full = _MODE.full if full is None else full
  done = directory in _MODE.checked  # already fully verified in this verification()
  full = full and not done
  for name, record in files.items():
    problem = file_problem(directory / name, record, full, name)
    if problem:
      _note(kind, directory, "damaged", damaged_message(kind, directory, problem, rebuild))
      raise UserError(damaged_message(kind, directory, problem, rebuild))
  if full:
    _MODE.checked.add(directory)
  _note(kind, directory, "ok", "" if full or done else "sizes and headers checked")
  return dict(manifest)


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

  Every file under `directory` (but leftover temporaries) is recorded in `files`: size,
  sha256, and dtype/shape of .npy files; loads check them (`check_files`).
  """
  manifest = {"kind": kind, "inputs": dict(inputs), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": library_versions(), **extra, "files": files_record(directory)}
  atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, default=str))
  return manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
  """The manifest of a committed artifact directory, or None if absent."""
  path = Path(directory) / MANIFEST
  if not path.exists():
    return None
  return json.loads(path.read_text())


def committed(spec: str, kind: str) -> Path | None:
  """`spec` as a directory if it is a committed artifact of `kind` (how a run bundle names
  its dataset and datastore in a config), else None."""
  path = Path(spec).expanduser() if spec else None
  if path is None or not (path / MANIFEST).is_file():
    return None
  manifest = read_manifest(path)
  return path if manifest is not None and manifest.get("kind") == kind else None


def check_manifest(directory: str | os.PathLike, expected: Mapping[str, str],
                   rebuild_hint: str, rebuild: str = "") -> dict:
  """Returns the manifest if every expected input hash matches and its files are intact
  (`check_files`, with `rebuild` the command that rebuilds it); else one-line UserError."""
  directory = Path(directory)
  manifest = read_manifest(directory)
  if manifest is None:
    raise UserError(f"{directory} has no {MANIFEST} (incomplete or foreign artifact); "
                    f"{rebuild_hint}")
  inputs = manifest.get("inputs", {})
  for name, want in expected.items():
    got = inputs.get(name)
    if got != want:
      message = (f"stale {manifest.get('kind', 'artifact')} at {directory}: it was built "
                 f"with {name}={got}, this run uses {name}={want}; {rebuild_hint}")
      _note(manifest.get("kind", "artifact"), directory, "stale", message)
      raise UserError(message)
  return check_files(directory, manifest, rebuild)


def is_uri(path: str | os.PathLike) -> bool:
  """True for an object-store path (gs://, s3://, ...): no rename, no append, no memmap."""
  return "://" in os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` so that a reader never sees half of it: a local file through a
  temporary name and a rename; an object (gs://...) is written whole by the store."""
  if is_uri(path):
    epath.Path(path).write_text(text)
    return
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


def may_build(final: str | os.PathLike) -> None:
  """Raises `NotBuilt` under `verification(build=False)`: call before building `final`."""
  if not _MODE.build:
    raise NotBuilt(Path(final))


def partial_dir(final: str | os.PathLike) -> Path:
  """The persistent work directory of an unfinished build (kept across interruptions)."""
  may_build(final)
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
  `<final>.partial` so a rerun can resume from the shards already written. What a resumed
  build reuses is verified against the checksums recorded when it was written, before it
  is used: shards and joined arrays by `retrieval.shards.sharded_rows`, a finished TFDS
  preparation by `data.dataset`; a damaged piece is recomputed. The rest of a build is
  rewritten from the start, and the manifest records the checksums of what is committed.
  """
  work = partial_dir(final)
  yield work
  commit_dir(work, final)
