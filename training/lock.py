"""The run-directory lock: one training process writes to a workdir at a time.

    with RunLock(workdir) as lock:
      lock.acquire()        # UserError naming the holder if another process trains here
      ...                   # write checkpoints, metrics.jsonl, config.json

This module owns `<workdir>/.lock`. The lock is the kernel's `flock` on that file, held
through an open file descriptor for as long as the process trains: it is released when
the descriptor is closed (`release`, the end of the `with`) or when the process dies in
any way, SIGKILL included, so a crashed run never leaves a stale lock. The descriptor is
not inherited by child processes (Python opens files non-inheritable).

The holder writes who it is (pid, host, start time, command) into the file, so a second
writer can name it; a second writer only opens and reads the file, it never changes it.
The details of the last holder stay in the file after it is released: only the kernel's
lock says whether the run is live. The file is never deleted: a process could otherwise
lock the deleted file while a third locks a new file of the same name.

Only process 0 of a multi-process job takes the lock (the others write nothing the lock
guards). Readers (`eval.py`, `generate.py`, `load_checkpoint`) never take it. On a
filesystem without `flock` support, or a workdir given as a URI (gs://...), the run goes
on unlocked, after a one-line warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import jax

from common.errors import UserError

LOCK_FILE = ".lock"
_COMMAND_CHARS = 200  # the holder's command is cut to this length in the error message


def lock_path(workdir: str | os.PathLike) -> Path:
  """The lock file of a run directory."""
  return Path(workdir) / LOCK_FILE


def _command() -> str:
  """This process's command line, as a user would type it (`python train.py ...`)."""
  return shlex.join([Path(sys.executable).name, *sys.argv])


def _holder_info() -> dict[str, Any]:
  now = datetime.datetime.now(datetime.timezone.utc)
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "since": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "command": _command()}


def describe_holder(text: str) -> str:
  """'pid 1234 on host h, since <time>: <command>' from the lock file's contents."""
  try:
    info = json.loads(text)
    pid, host, since = info["pid"], info["host"], info["since"]
  except (ValueError, KeyError, TypeError):
    return "which has not written its details yet"  # between its flock and its write
  command = " ".join(str(info.get("command", "")).split())  # one line, whatever it held
  if len(command) > _COMMAND_CHARS:
    command = command[:_COMMAND_CHARS - 3] + "..."
  return f"pid {pid} on host {host}, since {since}" + (f": {command}" if command else "")


class RunLock:
  """An exclusive, non-blocking lock on a run directory, for one training process.

  `acquire()` creates the directory if it is missing (the directory only) and takes the
  lock, or raises a one-line `UserError` naming the process that holds it. Leaving the
  `with` (or `release()`) lets it go. `acquire` is a no-op on processes other than 0.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.remote = "://" in os.fspath(workdir)
    self.workdir = Path(workdir)
    self.path = lock_path(workdir)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Takes the lock and records this process in the file; UserError if it is taken.

    A workdir given as a URI (gs://...) has no flock: the run goes on unlocked.
    """
    if self.held or jax.process_index() != 0:
      return
    if self.remote:
      print(f"warning: {self.workdir} is not on a local filesystem: no lock, so a second "
            f"train.py on this workdir is not detected", file=sys.stderr, flush=True)
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64 * 1024, 0).decode(errors="replace")
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(f"{self.workdir} is being trained by another process "
                        f"({describe_holder(holder)}); wait for it to finish or stop it, "
                        f"or use another --workdir") from None
      print(f"warning: cannot lock {self.path} ({os.strerror(e.errno or 0)}): this "
            f"filesystem has no flock, so a second train.py on this workdir is not "
            f"detected", file=sys.stderr, flush=True)
      return
    info = (json.dumps(_holder_info()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    self._fd = fd

  def release(self) -> None:
    """Lets the lock go (closing the descriptor releases the flock)."""
    fd, self._fd = self._fd, None
    if fd is not None:
      os.close(fd)

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
