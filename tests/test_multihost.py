"""Multi-process training on CPU: two processes of one device each (jax.distributed over
127.0.0.1, gloo collectives) against one process of two devices, with the same global batch.

Every process runs this file as a script (`_worker`), which is `train.py`'s own `main` plus
two test hooks read from the environment: TEST_INDICES (append the sequence ids of every
training batch this process loads to that file) and TEST_PAUSE_AT_STEP (stop in the
training batch of that step, so the test can SIGKILL the process at a known point).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

import configs
import synthetic
from data import dataset
from common.artifacts import atomic_write_text
from training import checkpoint, metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5  # train.heartbeat_timeout_s of the runs here
TRAIN = ["train.steps=6", "train.warmup_steps=2", "train.checkpoint_every=2",
         "train.keep_checkpoints=5", "train.eval_every=1000", "train.log_every=1",
         "data.batch_size=4", "eval.batch_size=2", "eval.batches=1",
         f"train.heartbeat_timeout_s={HEARTBEAT_S}"]
# Unoptimised XLA code compiles twice as fast; every run here uses it.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: Path, overrides: list[str], devices: int, process: int | None = None,
           port: int = 0, **env: str) -> subprocess.Popen:
  """One process of a run: `process` None is a single-process run on `devices` devices."""
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env,
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}"}
  if process is not None:
    full_env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(process))
  args = [sys.executable, __file__, "--config", "tiny_retro", "--workdir", str(workdir),
          *[f"--config.{o}" for o in overrides]]
  return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process, asserting each exited 0."""
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _two_processes(workdir: Path, overrides: list[str], **env: str) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start(workdir, overrides, 1, i, port,
                 TEST_INDICES=str(workdir.parent / f"{workdir.name}.indices{i}.jsonl"), **env)
          for i in range(2)]


def _indices(path: Path) -> dict[int, list[int]]:
  """step -> the sequence ids a process loaded for that training batch."""
  return {r["step"]: r["index"] for r in map(json.loads, path.read_text().splitlines())}


def _losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")
          if "train/loss" in r}


def _params(workdir: Path, step: int | None = None) -> list[np.ndarray]:
  """The params of a checkpoint, restored in this (one-device) process."""
  return [np.asarray(x) for x in jax.tree.leaves(checkpoint.load_params(workdir, step))]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
  corpus = synthetic.corpus_overrides(tmp_path_factory.mktemp("corpus"), num_docs=6,
                                      words_per_doc=800)
  return [*corpus, *TRAIN]


@pytest.fixture(scope="module")
def runs(overrides, tmp_path_factory) -> dict[str, Path]:
  """The two-process run (process 0 builds the artifacts), then the one-process reference."""
  root = tmp_path_factory.mktemp("runs")
  _finish(_two_processes(root / "two", overrides))
  _finish([_start(root / "one", overrides, 2, TEST_INDICES=str(root / "one.indices.jsonl"))])
  return {"root": root, "two": root / "two", "one": root / "one"}


def test_two_processes_equal_one_process_on_two_devices(runs, overrides):
  root = runs["root"]
  per_process = [_indices(root / f"two.indices{i}.jsonl") for i in range(2)]
  reference = _indices(root / "one.indices.jsonl")
  cfg = configs.load("tiny_retro", overrides)
  num = dataset.prepare(cfg).train.num_sequences
  for step in range(cfg.train.steps):
    first, second = per_process[0][step], per_process[1][step]
    assert len(first) == len(second) == 2 and not set(first) & set(second), (step, first, second)
    global_B = dataset.batch_indices(num, 4, cfg.seed, step).tolist()
    assert first + second == reference[step] == global_B
  two, one = _losses(runs["two"]), _losses(runs["one"])
  assert sorted(two) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(two)],
                             rtol=1e-6)
  for a, b in zip(_params(runs["two"]), _params(runs["one"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_killed_process_stops_the_other_and_rerun_resumes(runs, overrides):
  """SIGKILL process 1 in step 5 (the checkpoint of step 2 is complete, 4 may not be):
  process 0 stops with one line instead of hanging; rerunning both resumes from the last
  checkpoint and ends on the uninterrupted run's parameters."""
  workdir = runs["root"] / "killed"
  port = _free_port()
  survivor = _start(workdir, overrides, 1, 0, port)
  victim = _start(workdir, overrides, 1, 1, port, TEST_PAUSE_AT_STEP="5")
  try:
    for line in victim.stdout:  # hang guard: the victim pauses after a few seconds
      if line.startswith("test: paused at step 5"):
        break
    victim.send_signal(signal.SIGKILL)
    _, err = survivor.communicate(timeout=HEARTBEAT_S + 120)  # stops instead of hanging
  finally:
    for p in (survivor, victim):
      if p.poll() is None:
        p.kill()
    victim.communicate()
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert survivor.returncode == 2 and len(lines) == 1, err[-3000:]
  assert lines[0].startswith("error: process 0 of 2 stops: another process of this job is gone")
  assert "rerun every process" in lines[0]
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    saved = ckpt.all_steps()
  assert saved[0] == 2, saved

  (out, _), _ = _finish(_two_processes(workdir, overrides))
  assert f"resuming from step {saved[-1]}" in out
  assert _losses(workdir) == pytest.approx(_losses(runs["two"]), rel=1e-6)
  for a, b in zip(_params(workdir), _params(runs["two"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_workdir_uri_is_not_mangled(tmp_path, monkeypatch):
  """A gs:// workdir keeps its scheme (`Path.absolute` would make it ./gs:/bucket/run)."""
  assert str(checkpoint.checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.checkpoint_dir("run")) == str(tmp_path / "run" / "checkpoints")


@pytest.fixture
def gs_bucket(tmp_path):
  """gs://bucket/... served from `tmp_path` through etils.epath's mock backend."""
  def local(fn, path, *args, **kwargs):
    return fn(str(path).replace("gs://bucket", str(tmp_path)), *args, **kwargs)
  names = ("open", "exists", "mkdir", "makedirs", "isdir", "listdir", "glob", "remove", "stat")
  with epath_testing.mock_epath(**{name: local for name in names}):
    yield tmp_path


def test_metrics_go_to_a_uri_workdir_whole_and_resume(gs_bucket, monkeypatch):
  """metrics.jsonl, config-style JSON and loss.png reach a gs:// workdir through epath
  (object stores cannot append: the file is rewritten whole); a resumed writer drops the
  records after the checkpoint it resumes from."""
  monkeypatch.setattr(metrics_lib, "SummaryWriter", lambda logdir: _NullTensorBoard())
  with metrics_lib.MetricsWriter("gs://bucket/run") as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": 4.0 - step})
  assert [r["step"] for r in metrics_lib.read_jsonl(gs_bucket / "run" / "metrics.jsonl")] == \
      [1, 2, 3]
  with metrics_lib.MetricsWriter("gs://bucket/run", resume_step=2) as writer:
    writer.write(3, {"loss": 0.5})
  records = metrics_lib.read_jsonl("gs://bucket/run/metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in records] == [(1, 3.0), (2, 2.0), (3, 0.5)]
  atomic_write_text("gs://bucket/run/final_metrics.json", json.dumps({"step": 3}))
  assert json.loads((gs_bucket / "run" / "final_metrics.json").read_text()) == {"step": 3}
  metrics_lib.write_loss_plot("gs://bucket/run/metrics.jsonl", "gs://bucket/run/loss.png")
  assert (gs_bucket / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


class _NullTensorBoard:
  def add_scalar(self, *args) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


def _worker(argv: list[str]) -> None:
  """`train.main(argv)` with the test hooks of the module docstring."""
  import train
  from training import loop

  pause = int(os.environ.get("TEST_PAUSE_AT_STEP", "-1"))
  log = os.environ.get("TEST_INDICES")
  train_batch = loop.train_batch

  def hooked(config, artifacts, step, mesh=None):
    if step == pause:
      print(f"test: paused at step {step}", flush=True)
      time.sleep(3600)
    batch = train_batch(config, artifacts, step, mesh)
    if log:
      with open(log, "a") as f:
        f.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
    return batch

  loop.train_batch = hooked
  train.main(argv)


if __name__ == "__main__":
  _worker(sys.argv[1:])
