"""The shared resumable sharded writer: every retrieval artifact computed row block by row
block (neighbours, candidates, chunk and query-window embeddings, kNN-LM keys) goes
through `sharded_rows`.

    arrays = sharded_rows(work / "train", num_rows, rows_per_shard, compute, desc="...")

`compute(start, stop)` returns name -> array of rows [start, stop) (any row count per shard
on axis 0). The missing shards are computed by the active `pipeline.Runner`: an Apache
Beam pipeline, one item a shard, in this process by default, or in N worker processes or
on a cluster runner (`compute` then pickled, its big inputs by reference); the tokenized
token stores (data/dataset.py) and on-disk index shards (ondisk.py) too. Shards are saved
atomically under `<directory>/shards/` with a done-marker written last, so a rerun after
an interruption (even SIGKILL) recomputes only the unfinished shards. When all are done
they are joined into `<directory>/<name>.npy`, `arrays.json` lists them, and the shards
are removed; a directory that has `arrays.json` for the same job is returned without work.

A shard's done-marker records each of its files (bytes, dtype, shape, sha256), and so does
`arrays.json` for the joined arrays. What a rerun finds from an earlier process is verified
against those records (checksums included) before it is reused: a damaged shard is
recomputed, damaged joined arrays are recomputed from scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from tqdm.auto import tqdm

from common import artifacts
from retrieval import pipeline

LISTING = "arrays.json"  # name -> {shape, dtype, bytes, sha256} of the joined arrays; last
JOB = "job.json"  # what the shards were computed for; another job discards them


def sharded_rows(directory: str | os.PathLike, num_rows: int, rows_per_shard: int,
                 compute: Callable[..., Mapping[str, np.ndarray]], desc: str,
                 unit: str = "row", units_per_row: int = 1, *,
                 job: Mapping[str, Any] | None = None,
                 compute_advances_bar: bool = False) -> dict[str, np.ndarray]:
  """Computes rows [0, num_rows) shard by shard, resumably, into `directory/<name>.npy`.

  Args:
    directory: where the shards and then the joined arrays go.
    num_rows, rows_per_shard: the rows and how many make one resumable shard.
    compute: (start, stop) -> name -> array with the rows [start, stop) on axis 0; with
      `compute_advances_bar`, (start, stop, bar) and it advances the tqdm `bar` itself
      (finer progress than per shard; the bar is set to the shard's end afterwards).
    desc, unit, units_per_row: the progress bar (units_per_row units per row).
    job: what else the rows depend on (input hashes); shards or arrays of another job
      found in `directory` are discarded, not resumed.
  Returns:
    The joined arrays, memory-mapped.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  listing, job_file, shard_dir = directory / LISTING, directory / JOB, directory / "shards"
  job_text = json.dumps({"num_rows": num_rows, "rows_per_shard": rows_per_shard,
                         **(job or {})}, sort_keys=True, default=str)
  if job_file.exists() and job_file.read_text() != job_text:  # another job's leftovers
    if listing.exists():
      for name in json.loads(listing.read_text()):
        (directory / f"{name}.npy").unlink(missing_ok=True)
      listing.unlink()
    shutil.rmtree(shard_dir, ignore_errors=True)
  if listing.exists():  # joined by an earlier process: verify before trusting it
    problem = _listing_problem(directory)
    if problem:
      print(f"{directory}: {problem}; recomputing its arrays", flush=True)
      for name in json.loads(listing.read_text()):
        (directory / f"{name}.npy").unlink(missing_ok=True)
      listing.unlink()
  if not listing.exists():
    if shard_dir.exists() and not job_file.exists():  # shards of unknown provenance
      shutil.rmtree(shard_dir)
    artifacts.atomic_write_text(job_file, job_text)
    shard_dir.mkdir(exist_ok=True)
    starts = range(0, num_rows, rows_per_shard)
    markers = [shard_dir / f"{i:05d}.done" for i in range(len(starts))]
    for i, marker in enumerate(markers):  # shards of an earlier process: verify them
      problem = _shard_problem(shard_dir, i) if marker.exists() else None
      if problem:
        print(f"shard {i} of {directory} is damaged ({problem}); recomputing it", flush=True)
        marker.unlink()
    missing = [i for i, marker in enumerate(markers) if not marker.exists()]
    done = num_rows - sum(min(rows_per_shard, num_rows - starts[i]) for i in missing)
    runner = pipeline.current()
    with tqdm(total=num_rows * units_per_row, initial=done * units_per_row, desc=desc,
              unit=unit, unit_scale=True) as bar:
      job = _ShardJob(shard_dir, num_rows, rows_per_shard, units_per_row, compute,
                      compute_advances_bar, bar if runner.in_process else None)
      with _progress_from_markers(bar, markers, rows_per_shard, num_rows, units_per_row,
                                  enabled=not runner.in_process):
        runner.map(desc, job, missing)
    _join(directory, shard_dir, len(starts), list(json.loads(markers[0].read_text())))
    shutil.rmtree(shard_dir)
  return {name: np.load(directory / f"{name}.npy", mmap_mode="r")
          for name in json.loads(listing.read_text())}


@dataclasses.dataclass
class _ShardJob:
  """The stage body run by the pipeline for each missing shard i: computes its rows, saves
  each array atomically, then its done-marker (what a rerun trusts)."""

  shard_dir: Path
  num_rows: int
  rows_per_shard: int
  units_per_row: int
  compute: Callable[..., Mapping[str, np.ndarray]]
  compute_advances_bar: bool
  bar: Any = None  # the progress bar, in this process only (not sent to workers)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "bar": None}

  def __call__(self, i: int) -> None:
    start = i * self.rows_per_shard
    stop = min(start + self.rows_per_shard, self.num_rows)
    bar = self.bar if self.bar is not None else tqdm(disable=True)
    before = bar.n
    arrays = (self.compute(start, stop, bar) if self.compute_advances_bar
              else self.compute(start, stop))
    records = {}
    for name in sorted(arrays):
      path = self.shard_dir / f"{i:05d}.{name}.npy"
      artifacts.atomic_save_npy(path, arrays[name])
      records[name] = artifacts.file_record(path)
    artifacts.atomic_write_text(self.shard_dir / f"{i:05d}.done", json.dumps(records))
    bar.update(before + (stop - start) * self.units_per_row - bar.n)


@contextlib.contextmanager
def _progress_from_markers(bar: tqdm, markers: list[Path], rows_per_shard: int,
                           num_rows: int, units_per_row: int, enabled: bool) -> Iterator[None]:
  """Advances `bar` from the done-markers workers write (once a second), while the block runs."""
  stop = threading.Event()

  def watch() -> None:
    while not stop.wait(1.0):
      done = sum(min(rows_per_shard, num_rows - i * rows_per_shard)
                 for i, marker in enumerate(markers) if marker.exists())
      bar.update(done * units_per_row - bar.n)

  thread = threading.Thread(target=watch, daemon=True) if enabled else None
  if thread:
    thread.start()
  try:
    yield
  finally:
    stop.set()
    if thread:
      thread.join()


def _shard_problem(shard_dir: Path, i: int) -> str | None:
  """What is wrong with shard i's files against its done-marker's records, or None.
  (A marker of the older format lists only names: then the .npy headers and sizes.)"""
  try:
    records = json.loads((shard_dir / f"{i:05d}.done").read_text())
  except (OSError, ValueError):
    return "its done-marker is unreadable"
  if isinstance(records, list):
    records = {name: {} for name in records}
  for name, record in records.items():
    problem = artifacts.file_problem(shard_dir / f"{i:05d}.{name}.npy", record, full=True,
                                     source="its done-marker")
    if problem:
      return problem
  return None


def _listing_problem(directory: Path) -> str | None:
  """What is wrong with the joined arrays against `arrays.json`, or None."""
  try:
    records = json.loads((directory / LISTING).read_text())
  except (OSError, ValueError):
    return f"{LISTING} is unreadable"
  for name, record in records.items():
    problem = artifacts.file_problem(directory / f"{name}.npy", record, full=True,
                                     source=LISTING)
    if problem:
      return problem
  return None


def _join(directory: Path, shard_dir: Path, num_shards: int, names: list[str]) -> None:
  """Concatenates every array's shards along axis 0 (through a memmap), then writes the
  listing: arrays named there are complete."""
  shapes = {}
  for name in names:
    parts = [np.load(shard_dir / f"{i:05d}.{name}.npy", mmap_mode="r") for i in range(num_shards)]
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    tmp = directory / f".{name}.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=shape)
    row = 0
    for part in parts:
      out[row:row + len(part)] = part
      row += len(part)
    out.flush()
    del out
    os.replace(tmp, directory / f"{name}.npy")
    shapes[name] = artifacts.file_record(directory / f"{name}.npy")
  artifacts.atomic_write_text(directory / LISTING, json.dumps(shapes, indent=2))
