"""User errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
  """A problem with the user's input (config, corpus, artifact, workdir).

  The message is one line that says what is wrong and how to fix it. A subclass whose
  `skip_cleanup` is True makes `cli_main` exit without running exit handlers.
  """


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
  """Wraps a command-line entry point: a UserError prints one line and exits 2.

  Also quiets absl (orbax) logging below ERROR, so the terminal shows what matters.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    from absl import logging as absl_logging  # orbax logs routine warnings through absl

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      if getattr(e, "skip_cleanup", False):  # e.g. a peer process died: no exit handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
      sys.exit(2)

  return wrapper
