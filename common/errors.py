"""User errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
  """A problem with the user's input (config, corpus, artifact, workdir).

  The message is one line that says what is wrong and how to fix it.
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
      sys.exit(2)

  return wrapper
