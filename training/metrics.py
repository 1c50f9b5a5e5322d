"""Metric logging that never stalls the device: lagged fetches, metrics.jsonl, TensorBoard, PNG.

    lagged, writer = Lagged(), MetricsWriter(workdir)
    for step in ...:
      state, m = train_step(state, batch)      # dispatched, not waited for
      if (done := lagged.push(step, m)):       # the previous step's values, now ready
        writer.write(*done, prefix="train")
    if (done := lagged.flush()):
      writer.write(*done, prefix="train")
    write_loss_plot(writer.jsonl_path, workdir / "loss.png")

metrics.jsonl holds one JSON object per line: {"step": 10, "train/loss": 3.1, ...}.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from common.artifacts import atomic_write_text, is_uri
from common.errors import UserError

JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device metrics -> Python floats (lists for non-scalars); blocks until they are ready."""
  values = jax.device_get(dict(metrics))
  return {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in values.items()}


class Lagged:
  """Holds one step's device metrics and fetches them only after the next step is dispatched.

  `push(step, metrics)` stores the new (still computing) metrics and returns the previous
  push as `(step, host metrics)`, or None on the first push; `flush()` returns the last one.
  """

  def __init__(self):
    self._pending: tuple[int, Mapping[str, Any]] | None = None

  def push(self, step: int, metrics: Mapping[str, Any]) -> tuple[int, dict[str, Any]] | None:
    previous, self._pending = self._pending, (step, metrics)
    return None if previous is None else (previous[0], to_host(previous[1]))

  def flush(self) -> tuple[int, dict[str, Any]] | None:
    previous, self._pending = self._pending, None
    return None if previous is None else (previous[0], to_host(previous[1]))


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` (flushed per line) and TensorBoard events.

  Only process 0 writes on a multi-host job. `resume_step` drops records after that step
  (written by a run that died after its last checkpoint), so a resumed curve has no repeats.
  A `gs://` (any URI) workdir goes through `etils.epath`; object stores cannot append, so
  there the whole file is rewritten at each write (metrics files are small).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
    self.workdir = epath.Path(workdir)
    self.jsonl_path = self.workdir / JSONL
    self.enabled = jax.process_index() == 0
    self._file = None
    self._tb = None
    self._lines: list[str] | None = None  # a URI workdir: every line, rewritten per write
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    kept = None
    if resume_step is not None and self.jsonl_path.exists():
      kept = [json.dumps(r) + "\n" for r in read_jsonl(self.jsonl_path) if r["step"] <= resume_step]
    if is_uri(self.workdir):
      self._lines = kept if kept is not None else (
          [json.dumps(r) + "\n" for r in read_jsonl(self.jsonl_path)]
          if self.jsonl_path.exists() else [])
    else:
      if kept is not None:
        atomic_write_text(self.jsonl_path, "".join(kept))
      self._file = open(self.jsonl_path, "a")
    self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
    """One record `{"step": step, "<prefix>/<name>": value, ...}`; scalars also to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step), **{f"{prefix}/{k}": v for k, v in to_host(metrics).items()}}
    if self._lines is None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    else:
      self._lines.append(json.dumps(record) + "\n")
      atomic_write_text(self.jsonl_path, "".join(self._lines))
    for name, value in record.items():
      if name != "step" and isinstance(value, float):
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      if self._file is not None:
        self._file.close()
      self._tb.close()
      self._file = self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  records = []
  for line in epath.Path(path).read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def write_loss_plot(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
  """Train loss (line) and eval loss (markers) against step, as a PNG."""
  path = epath.Path(metrics_jsonl_path)
  if not path.exists():
    raise UserError(f"no metrics file at {path}; train first (python train.py --config NAME)")
  records = read_jsonl(path)
  series = {key: [(r["step"], r[key]) for r in records if key in r]
            for key in ("train/loss", "eval/loss")}
  if not any(series.values()):
    raise UserError(f"{path} has no train/loss or eval/loss records; train for a few steps first")
  fig = Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.add_subplot()
  for key, style in (("train/loss", dict(lw=1.2)), ("eval/loss", dict(marker="o", lw=1.5))):
    if series[key]:
      steps, values = zip(*series[key])
      ax.plot(steps, values, label=key.replace("/", " "), **style)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  epath.Path(png_path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(png_path).write_bytes(png.getvalue())
