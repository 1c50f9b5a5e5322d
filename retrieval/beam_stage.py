"""The Beam side of `pipeline.Runner` (imported only when a stage runs: Beam is slow to
import): the pipeline of one stage, the DoFn that runs its job, and the pickler that sends
memmaps and `by_reference` objects by reference."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from common.errors import UserError
from retrieval import pipeline


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
  """Beam's import warns on the root logger about optional GCP clients ("apitools not
  found"), which would also configure the root logger to print: both are kept out of a
  user's stderr (a UserError stays one line)."""
  root, handler, level = logging.getLogger(), logging.NullHandler(), logging.getLogger().level
  root.addHandler(handler)
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


with _quiet_root_logger():
  import apache_beam as beam
  from apache_beam.internal.cloudpickle import cloudpickle
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner


def runner_name(options: Sequence[str]) -> str | None:
  """The runner Beam pipeline options name (None: the default, DirectRunner)."""
  try:
    return PipelineOptions(list(options)).view_as(StandardOptions).runner
  except BaseException as e:  # argparse exits on a malformed option
    raise UserError(f"bad Beam pipeline options {' '.join(options)!r} ({e})") from None


def run(stage: str, items: list[Any], payload: int | bytes, threads: int,
        options: list[str], in_process: bool) -> None:
  """One pipeline: the items (spread over the workers), each through the stage's job."""
  with beam.Pipeline(runner=FnApiRunner() if in_process else None,
                     options=PipelineOptions(options)) as p:
    pcoll = p | f"{stage}: shards" >> beam.Create(items)
    if not in_process:  # spread the items over the workers
      pcoll = pcoll | f"{stage}: spread" >> beam.Reshuffle()
    _ = pcoll | stage >> beam.ParDo(_Apply(payload, stage, threads))


class _Apply(beam.DoFn):
  """Runs the stage's job on each item (the worker side of `Runner.map`)."""

  def __init__(self, payload: int | bytes, stage: str, threads: int):
    self._payload, self._stage, self._threads = payload, stage, threads

  def setup(self) -> None:
    if isinstance(self._payload, int):
      self._job, self._errors = pipeline.in_process_jobs[self._payload]
      return
    if self._threads:  # a fresh worker process: before the job's unpickling imports jax
      os.environ["OMP_NUM_THREADS"] = str(self._threads)
      if self._threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false")
    self._job, self._errors = cloudpickle.loads(self._payload), None
    if self._threads:
      import faiss  # pylint: disable=import-outside-toplevel
      faiss.omp_set_num_threads(self._threads)

  def process(self, item: Any) -> Iterator[Any]:
    try:
      self._job(item)
    except BaseException as e:  # KeyboardInterrupt too: re-raised as it was, in process
      if self._errors is not None:
        self._errors.append(e)
        raise
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise RuntimeError(f"{pipeline.ERROR} {type(e).__name__}: {first} (stage "
                         f"{self._stage!r}, item {item!r})") from e
    yield item


class _Pickler(cloudpickle.Pickler):
  """cloudpickle that sends memory-mapped arrays and by_reference objects by reference."""

  def reducer_override(self, obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
      reduced = pipeline.memmap_reduce(obj)
      if reduced is not None:
        return reduced
    elif not isinstance(obj, type) and pipeline.referenced(obj):
      return pipeline.load, pipeline.references[obj]
    return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
  """The job, pickled for workers (see `_Pickler`)."""
  with io.BytesIO() as f:
    _Pickler(f, protocol=5).dump(obj)
    return f.getvalue()
