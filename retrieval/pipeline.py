"""Apache Beam runs every sharded stage of the artifact builds (the one way to build).

    runner = Runner(workers=2)            # Beam's DirectRunner with 2 worker processes
    runner = Runner(1)                    # the same pipeline, one worker in this process
    runner = Runner(0, ["--runner=DataflowRunner", "--project=P", "--region=R",
                        "--temp_location=gs://B/tmp"])   # any Beam runner, options passed on
    with runner.active():                 # every shards.sharded_rows inside runs on it
      build.build_all(config)
    runner.map("embed chunks", job, [0, 3, 4])   # job(i) for each item, one Beam pipeline

A stage is a callable `job(item)` that writes its own output file atomically with a
done-marker (shards.py), so a pipeline's results are files, not PCollections: the stage is
resumable item by item and its outputs do not depend on the number of workers. Without an
active runner, `current()` is `Runner(1)`, which runs the pipeline on Beam's local portable
runner (the engine inside the DirectRunner) in this process, with the job unpickled (about
0.2 s a stage). With more workers or another runner the job is pickled once per pipeline
(Beam's cloudpickle) and big objects go by reference: a memory-mapped array as (file,
offset, shape, strides), an object registered with `by_reference` as its loader and
arguments (the embedder and the FAISS index: each worker loads them once). Worker processes
share the cores: each gets `cores // workers` threads for XLA and FAISS.

A worker that dies (killed, out of memory) fails the pipeline with `WorkerDied` (a
UserError: one line); the shards written before are kept and a rerun computes the rest.
An exception in a job is re-raised here: in this process as it was raised, from a worker
as a one-line `UserError` when it was one, else as a `RuntimeError` naming the stage and
the item.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from common.errors import UserError

LOCAL_RUNNERS = (None, "DirectRunner")  # the runners that start workers on this machine
ERROR = "retrozoo-stage-error"  # marks a job's exception in a worker's traceback text
in_process_jobs: dict[int, tuple[Callable[[Any], None], list[BaseException]]] = {}
_job_ids = itertools.count()
references: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # obj -> (loader, args)
_loaded: dict[tuple, Any] = {}  # a worker's by_reference objects, loaded once
_active: list[Runner] = []


class WorkerDied(UserError):
  """A worker process of a local pipeline died before its stage finished (one line: the
  command line prints it and exits 2; rerunning resumes)."""


class Runner:
  """Where the pipelines run: `workers` processes of the DirectRunner (0: one per core), or
  the Beam runner that `options` name (e.g. `--runner=DataflowRunner ...`)."""

  def __init__(self, workers: int = 0, options: Sequence[str] = ()):
    if workers < 0:
      raise UserError(f"--workers={workers} must be >= 0 (0: one per core)")
    self.workers = workers or os.cpu_count() or 1
    self.options = tuple(options)
    self.runner_name = None
    if self.options:
      from retrieval import beam_stage  # pylint: disable=import-outside-toplevel
      self.runner_name = beam_stage.runner_name(self.options)
    self.local = self.runner_name in LOCAL_RUNNERS
    self.stage_seconds: dict[str, float] = {}  # wall time of each stage's pipelines

  @property
  def in_process(self) -> bool:
    """Whether jobs run unpickled in this process (one worker, local runner)."""
    return self.local and self.workers == 1

  def __repr__(self) -> str:
    where = f"{self.workers} local worker(s)" if self.local else self.runner_name
    return f"Runner({where})"

  @contextlib.contextmanager
  def active(self) -> Iterator[Runner]:
    """Makes this the runner of every stage started inside the block."""
    _active.append(self)
    try:
      yield self
    finally:
      _active.remove(self)

  def map(self, stage: str, job: Callable[[Any], None], items: Sequence[Any]) -> None:
    """Runs `job(item)` for every item as one Beam pipeline (see the module docstring)."""
    items = list(items)
    if not items:
      return
    start = time.perf_counter()
    from retrieval import beam_stage  # pylint: disable=import-outside-toplevel  (Beam: slow)
    if self.in_process:
      key, errors = next(_job_ids), []
      in_process_jobs[key] = (job, errors)
      payload: int | bytes = key
    else:
      payload = beam_stage.dumps(job)
    options = list(self.options)
    if self.local and not self.in_process:
      options += [f"--direct_num_workers={self.workers}",
                  "--direct_running_mode=multi_processing",
                  "--default_sdk_harness_log_level=WARNING"]
    threads = max(1, (os.cpu_count() or 1) // self.workers) if self.local else 0

    def run() -> None:
      beam_stage.run(stage, items, payload, threads, options, self.in_process)

    try:
      if self.in_process or not self.local:
        run()
      else:
        _run_watched(run, stage)
    except BaseException as e:
      if self.in_process and errors:
        raise errors[0] from None  # as the job raised it (KeyboardInterrupt included)
      raise _worker_error(stage, e) from None
    finally:
      if self.in_process:
        del in_process_jobs[key]
      self.stage_seconds[stage] = (self.stage_seconds.get(stage, 0.0)
                                   + time.perf_counter() - start)


def current() -> Runner:
  """The innermost active runner, else a one-worker local runner."""
  return _active[-1] if _active else Runner(1)


def by_reference(obj: Any, loader: Callable[..., Any], *args: Any) -> Any:
  """Marks `obj` to be sent to workers as `loader(*args)` (loaded once per worker)."""
  references[obj] = (loader, args)
  return obj


def _run_watched(run: Callable[[], None], stage: str) -> None:
  """Runs a local multi-process pipeline in a thread, watching its worker processes: if one
  dies (a signal, or gone while the pipeline still runs 5 s later), the others are killed
  and WorkerDied raised (Beam's runner would wait for the dead worker forever)."""
  outcome: list[BaseException] = []

  def target() -> None:
    try:
      run()
    except BaseException as e:  # handed to the caller's thread
      outcome.append(e)

  thread = threading.Thread(target=target, daemon=True, name=f"pipeline {stage}")
  thread.start()
  seen: set[int] = set()
  gone_at = None
  while thread.is_alive():
    thread.join(0.5)
    workers = _worker_processes()
    seen |= set(workers)
    signalled = [pid for pid, exit_code in workers.items() if exit_code & 0x7F]
    if seen - set(workers) and gone_at is None:
      gone_at = time.monotonic()
    if thread.is_alive() and (signalled or (gone_at and time.monotonic() - gone_at > 5)):
      for pid, exit_code in workers.items():
        if exit_code == 0:  # still running: our own child
          with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
      raise WorkerDied(f"a worker of stage {stage!r} died (pid "
                       f"{(signalled or sorted(seen - set(workers)))[0]}); the shards it "
                       f"finished are kept: rerun the same command to resume")
  if outcome:
    raise outcome[0]


def _worker_processes() -> dict[int, int]:
  """pid -> exit code (waitpid format; 0 while running) of this process's Beam workers."""
  found = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    with contextlib.suppress(OSError, ValueError, IndexError):
      fields = stat.read_text().rsplit(")", 1)[1].split()
      if int(fields[1]) == os.getpid() and b"sdk_worker_main" in (
          stat.with_name("cmdline").read_bytes()):
        found[int(stat.parent.name)] = int(fields[49]) if fields[0] == "Z" else 0
  return found


def _worker_error(stage: str, e: BaseException) -> BaseException:
  """The exception to raise here for a pipeline that failed in a worker: the job's."""
  text = str(e)
  found = re.search(rf"{ERROR} (\w+): (.*)", text)
  if found:
    kind, message = found.groups()
    return UserError(message) if kind == "UserError" else RuntimeError(
        f"stage {stage!r} failed in a worker: {kind}: {message}")
  return e


def referenced(obj: Any) -> bool:
  try:
    return obj in references
  except TypeError:  # unhashable or not weakly referenceable: never registered
    return False


def load(loader: Callable[..., Any], args: tuple) -> Any:
  key = (loader.__module__, loader.__qualname__, args)
  if key not in _loaded:
    _loaded[key] = by_reference(loader(*args), loader, *args)
  return _loaded[key]


def _open_view(path: str, offset: int, shape: tuple[int, ...], dtype: str,
               strides: tuple[int, ...]) -> np.ndarray:
  """A read-only view of `path` from byte `offset` (the inverse of `memmap_reduce`)."""
  extent = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
  buffer = np.memmap(path, np.uint8, "r", offset=offset, shape=(extent,))
  return np.ndarray(shape, dtype, buffer=buffer, strides=strides)


def memmap_reduce(array: np.ndarray) -> tuple | None:
  """(_open_view, its args) for an array that views a file-backed np.memmap, else None."""
  base = array
  while base is not None and not (isinstance(base, np.memmap) and base._mmap is not None):
    base = base.base if isinstance(base, np.ndarray) else None
  if (base is None or base.filename is None or array.size == 0
      or min(array.strides, default=0) < 0):
    return None
  mapped = np.frombuffer(base._mmap, np.uint8).__array_interface__["data"][0]
  file_start = base.offset - base.offset % mmap.ALLOCATIONGRANULARITY
  offset = file_start + array.__array_interface__["data"][0] - mapped
  return _open_view, (str(base.filename), offset, array.shape, array.dtype.str,
                      array.strides)
