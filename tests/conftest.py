"""Test-wide settings: Hugging Face stays offline; tokenizers do not fork threads; faiss
uses one thread; one persistent JAX compilation cache for the session.

The cache is a temporary directory made here, before any test module imports JAX, and
passed on through the environment, so the subprocesses the tests start (train.py, the
reliability drivers, notebook kernels) share it: a computation compiled once (the tiny
train step, the model forwards) is loaded instead of recompiled by every later test and
process. The thresholds are zero so the small CPU programs of the tests are cached too.
Setting JAX_COMPILATION_CACHE_DIR yourself keeps your directory instead (not deleted).
"""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread for faiss (and numpy's BLAS), here and in the tests' subprocesses: the
# suite runs two test workers on two cores, and faiss's spinning OpenMP threads on busy
# cores slow a search 7-20x (46 s -> 2.3 s for test_ivfpq_recall_against_exact).
os.environ.setdefault("OMP_NUM_THREADS", "1")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="retrozoo-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
