"""Stopping a training run cleanly: SIGTERM/SIGINT (or, multi-host, JAX's preemption
notice) asks the loop to save a checkpoint at the next step boundary and return."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax

from training import checkpoint


class StopSignals:
  """SIGTERM/SIGINT during training set a flag; the loop saves at the next step boundary.

  A second signal restores the previous handlers and re-delivers itself (Ctrl-C twice
  stops at once; checkpoints on disk stay consistent); an ignored signal stays ignored.
  Handlers are installed only in the main thread of a single-process job: a multi-host
  job uses JAX's preemption service instead, whose sync point every host consults after
  every step (`requested`), so all hosts save the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, ckpt: checkpoint.Checkpoints):
    self._ckpt = ckpt
    self._previous: dict[int, Any] = {}
    self.reason: str | None = None

  def __enter__(self) -> StopSignals:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                        if signal.getsignal(sig) is not signal.SIG_IGN}  # e.g. nohup'd jobs
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if self.reason is None:
      self.reason = name
      os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping "
                  f"(send {name} again to stop at once)\n".encode())
      return
    previous = self._previous.get(signum)
    self.__exit__()
    if callable(previous):
      previous(signum, frame)
    else:
      signal.raise_signal(signum)

  def requested(self, step: int) -> bool:
    """True once a signal arrived (or, multi-host, all hosts reached a preemption point)."""
    if self.reason is None and self._ckpt.reached_preemption(step):
      self.reason = "preemption"
    return self.reason is not None
