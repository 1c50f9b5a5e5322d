"""Reliability (issue #8): exact resume after SIGKILL (also mid-save), SIGTERM/SIGINT
preemption, resumable artifact builds, damaged artifact files, divergence, a full disk,
one-line errors for bad inputs through the command line, and one training process per
workdir (its lock). README's "What happens when..." table is checked against this file.

Subprocess runs use `DRIVER`: it imports the real entry point, optionally sends itself a
signal when a chosen train step starts (SIGNAL_AT_STEP, drawn from a seeded RNG: a failure
names the step and reruns the same) or kills itself at another chosen moment, then runs it.
The bad-input cases run their command lines one after another in one subprocess
(`BATCH_DRIVER`), each with its own stdout, stderr and exit code. The workdir-lock tests
pause a real `train.py` (`PAUSE_AFTER_SAVE`) and synchronise with it on its stdin/stdout
pipes, never on wall-clock time.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

import configs
import synthetic
import eval as eval_lib
import train
from common import artifacts
from common.errors import UserError
from retrieval import build, core, knn_datastore, neighbours, shards
from retrieval import verify as verify_lib
from test_embedder import write_tiny_bert
from training import checkpoint, loop
from training import lock as lock_lib
from training import metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"
STEPS, EVERY = 12, 4
TRAIN = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.warmup_steps=2",
         "train.eval_every=1000", "train.log_every=1"]
ENV = {**os.environ, "TQDM_DISABLE": "1"}  # stderr holds only what the program says

SEED = int(os.environ.get("RELIABILITY_SEED", "0"))  # set it to try other signal steps

DRIVER = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started
import training.loop as loop                               # where SIGINT is ignored
make_train_step = loop.make_train_step
def signalling_train_step(*args, **kwargs):
  step_fn, calls = make_train_step(*args, **kwargs), []
  def run(state, batch):
    calls.append(1)  # this call computes step len(calls) of this process
    if len(calls) == int(os.environ.get("SIGNAL_AT_STEP", "0")):
      os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return step_fn(state, batch)
  return run
loop.make_train_step = signalling_train_step
{patch}
sys.argv = sys.argv[1:]
if sys.argv[0].endswith(".py"):
  runpy.run_path(sys.argv[0], run_name="__main__")
else:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
KILL_MID_SAVE = """
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
save_fn = handler.JsonCheckpointHandler._save_fn
async def save_or_die(self, x, directory):
  if "/" + os.environ["KILL_AT_SAVE"] + ".orbax-checkpoint-tmp/" in str(directory):
    os.kill(os.getpid(), signal.SIGKILL)  # the state item may be half written by now
  return await save_fn(self, x, directory)
handler.JsonCheckpointHandler._save_fn = save_or_die
"""
KILL_MID_BUILD = """
import retrieval.core as core
import retrieval.neighbours as neighbours
neighbours.QUERY_CHUNKS_PER_SHARD = int(os.environ["CHUNKS_PER_SHARD"])
retrieve, calls = core.retrieve, []
def retrieve_or_die(*args, **kwargs):
  calls.append(1)
  if len(calls) > int(os.environ["KILL_AFTER_SHARDS"]):
    os.kill(os.getpid(), signal.SIGKILL)
  return retrieve(*args, **kwargs)
core.retrieve = retrieve_or_die
"""
PAUSE_AFTER_SAVE = """
import training.checkpoint as checkpoint
save = checkpoint.Checkpoints.save
def save_and_pause(self, step, *args, **kwargs):
  saved = save(self, step, *args, **kwargs)
  if step == int(os.environ["PAUSE_AFTER_SAVE"]):
    self.wait_until_finished()  # the step is on disk, renamed into place
    print("paused", flush=True)
    sys.stdin.readline()        # until the test writes a line or closes the pipe
  return saved
checkpoint.Checkpoints.save = save_and_pause
"""


# --- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
  """Overrides for a 10-document synthetic corpus and a module-private artifact cache."""
  return synthetic.corpus_overrides(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
  """An uninterrupted tiny_transformer run of STEPS steps: the reference for every resume."""
  workdir = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(configs.load("tiny_transformer", [*data, *TRAIN]), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def retro(data, tmp_path_factory) -> list[str]:
  """Overrides for tiny_retro with a tiny random BERT embedder; its artifacts built once."""
  bert = write_tiny_bert(tmp_path_factory.mktemp("embedder") / "bert")
  overrides = [*data, f"retrieval.embedder={bert}", "retrieval.embed_max_tokens=64"]
  build.build_all(configs.load("tiny_retro", overrides))
  return overrides


@pytest.fixture(scope="module")
def knn_run(data, tmp_path_factory) -> Path:
  """A tiny_knnlm checkpoint whose kNN-LM datastore was built by evaluating it."""
  root = tmp_path_factory.mktemp("knn")
  overrides = [*data, f"data.cache_dir={root / 'cache'}", "train.steps=2"]
  train.train_and_evaluate(configs.load("tiny_knnlm", overrides), str(root / "run"))
  eval_lib.evaluate(root / "run", knn={"k": 4}, overlap=False)  # no RETRO neighbours to embed
  return root / "run"


def _cli(overrides: list[str]) -> list[str]:
  return [f"--config.{o}" for o in overrides]


def _driver(*argv: str, patch: str = "", **env: str) -> subprocess.Popen:
  code = DRIVER.format(patch=patch)
  return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env={**ENV, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_step(workdir: Path) -> int:
  path = workdir / metrics_lib.JSONL
  records = metrics_lib.read_jsonl(path) if path.exists() else []
  return max((r["step"] for r in records), default=0)


def _seeded_step(test: str, low: int, high: int) -> int:
  """A step in [low, high] drawn from SEED and the test's name: the same on every run."""
  return random.Random(f"{SEED}/{test}").randint(low, high)


def _params(workdir: Path) -> list[np.ndarray]:
  _, params = train.load_checkpoint(workdir)
  return jax.tree.leaves(jax.device_get(params))


def _assert_same_params(workdir: Path, reference: Path) -> None:
  for got, want in zip(_params(workdir), _params(reference), strict=True):
    np.testing.assert_array_equal(got, want)


def _losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_jsonl(workdir / metrics_lib.JSONL)
          if "train/loss" in r}


def _tmp_step_dirs(workdir: Path) -> list[str]:
  return sorted(p.name for p in checkpoint.checkpoint_dir(workdir).glob("*.orbax-checkpoint-tmp*"))


def _handlers() -> dict[int, object]:
  return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _steps(workdir: Path) -> list[int]:
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    return ckpt.all_steps()


# --- 1. exact resume after SIGKILL -----------------------------------------------------------

def test_sigkill_at_random_step_resumes_bit_identical(data, straight, tmp_path, capsys):
  """Killed when a seeded random step starts, rerun: the same losses and bit-identical
  parameters."""
  workdir = tmp_path / "run"
  kill_at = _seeded_step("sigkill", 2, STEPS - 1)
  where = f"killed at the start of step {kill_at} (RELIABILITY_SEED={SEED})"
  argv = ["--config", "tiny_transformer", "--workdir", str(workdir), *_cli([*data, *TRAIN])]
  proc = _driver("train.py", *argv, SIGNAL="SIGKILL", SIGNAL_AT_STEP=str(kill_at))
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, (where, err[-3000:])
  logged = _logged_step(workdir)
  assert logged < kill_at, where
  assert not (workdir / "final_metrics.json").exists()

  capsys.readouterr()
  train.main(argv)  # the same command again
  resumed = re.search(r"resuming from step (\d+)", capsys.readouterr().out)
  first = int(resumed[1]) if resumed else 0
  # The latest checkpoint before the kill, or the one before it if that save was in flight.
  last = (kill_at - 1) // EVERY * EVERY
  assert first in (last, max(last - EVERY, 0)), (where, first)
  _assert_same_params(workdir, straight)
  assert _losses(workdir) == _losses(straight), where


def test_sigkill_during_checkpoint_save(data, straight, tmp_path, capsys):
  """Killed while step 8 is being written: only complete steps are trusted, the half-written
  one is deleted on restart, and the rerun ends bit-identical."""
  workdir = tmp_path / "run"
  proc = _driver("train.py", "--config", "tiny_transformer", "--workdir", str(workdir),
                 *_cli([*data, *TRAIN]), patch=KILL_MID_SAVE, KILL_AT_SAVE="8")
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  assert _tmp_step_dirs(workdir) == ["8.orbax-checkpoint-tmp"]
  assert _steps(workdir) == [4]
  config, _ = train.load_checkpoint(workdir)  # a reader sees step 4, whole
  assert config.train.steps == STEPS

  train.train_and_evaluate(configs.load("tiny_transformer", [*data, *TRAIN]), str(workdir))
  assert "resuming from step 4" in capsys.readouterr().out
  assert _tmp_step_dirs(workdir) == [] and _steps(workdir) == [4, 8, 12]
  _assert_same_params(workdir, straight)
  assert _losses(workdir) == _losses(straight)


# --- 2. preemption: SIGTERM / SIGINT --------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_step_and_exits_0(sig, data, straight, tmp_path, capsys):
  """The signal arrives when a seeded random step starts: that step finishes, is saved,
  and the rerun resumes from it to the uninterrupted run's parameters and losses."""
  workdir = tmp_path / "run"
  at = _seeded_step(sig.name, 1, STEPS - 2)
  where = f"{sig.name} at the start of step {at} (RELIABILITY_SEED={SEED})"
  proc = _driver("train.py", "--config", "tiny_transformer", "--workdir", str(workdir),
                 *_cli([*data, *TRAIN]), SIGNAL=sig.name, SIGNAL_AT_STEP=str(at))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, (where, err[-3000:])
  stopped = re.search(rf"stopped at step (\d+) on {sig.name}: checkpoint saved in (\S+); "
                      rf"rerun the same command to resume", out)
  assert stopped, (where, out[-2000:])
  step = int(stopped[1])
  assert step == at, where  # the step in flight finishes; no further step starts
  assert Path(stopped[2]) == checkpoint.checkpoint_dir(workdir) / str(step)
  assert _steps(workdir)[-1] == step  # saved at the step it stopped at, not the last interval
  assert "Traceback" not in err

  handlers = _handlers()
  train.train_and_evaluate(configs.load("tiny_transformer", [*data, *TRAIN]), str(workdir))
  assert _handlers() == handlers  # the loop's own handlers are gone again
  assert f"resuming from step {step}" in capsys.readouterr().out, where
  _assert_same_params(workdir, straight)
  assert _losses(workdir) == _losses(straight), where


# --- 3. atomic, resumable artifacts -----------------------------------------------------------

def test_killed_neighbour_build_resumes_from_last_shard(retro, tmp_path, monkeypatch):
  """SIGKILL in the 4th shard of RETRO neighbours: nothing is committed, 3 shards are kept,
  the rerun computes only the rest and equals a build that was never interrupted."""
  cache = tmp_path / "cache"
  shutil.copytree(Path(dict(o.split("=", 1) for o in retro)["data.cache_dir"]), cache,
                  ignore=shutil.ignore_patterns(neighbours.ARTIFACT))
  overrides = [*retro, f"data.cache_dir={cache}"]
  proc = _driver("retrieval.build", "--config", "tiny_retro", "--workers", "1",
                 *_cli(overrides),
                 patch=KILL_MID_BUILD, CHUNKS_PER_SHARD="16", KILL_AFTER_SHARDS="3")
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  [partial] = (cache / neighbours.ARTIFACT).iterdir()
  assert partial.name.endswith(".partial")
  final = partial.with_name(partial.name.removesuffix(".partial"))
  assert artifacts.read_manifest(final) is None and artifacts.read_manifest(partial) is None
  assert len(list(partial.glob("*/shards/*.done"))) == 3

  monkeypatch.setattr(neighbours, "QUERY_CHUNKS_PER_SHARD", 16)
  retrieve, calls = core.retrieve, []
  monkeypatch.setattr(core, "retrieve", lambda *a, **k: calls.append(1) or retrieve(*a, **k))
  resumed = build.build_all(configs.load("tiny_retro", overrides)).retrieved
  monkeypatch.undo()
  splits = resumed.manifest["shapes"]
  shards = sum(-(-shapes["neighbours"][0] // 8) for shapes in splits.values())  # 8 seq/shard
  assert len(calls) == shards - 3 and resumed.directory == final and not partial.exists()
  clean = build.build_all(configs.load("tiny_retro", retro)).retrieved  # never interrupted
  for split, arrays in clean.arrays.items():
    for name, array in arrays.items():
      np.testing.assert_array_equal(resumed.arrays[split][name], array)


# --- 3b. damaged artifact files ---------------------------------------------------------------

def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[:-40])


def _append(path: Path) -> None:
  path.write_bytes(path.read_bytes() + b"\0" * 40)


def _flip_bit(path: Path) -> None:
  """Flips one bit of the last byte: in a .npy file, data, not header; the size is kept."""
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))


def test_artifact_files_are_checked_on_load_and_by_verification(tmp_path):
  """The manifest lists every file (size, sha256, .npy dtype/shape). Every load catches a
  truncated, resized, re-headed or missing file with one line naming the artifact, the file,
  the problem and the fix; a flipped data bit only the full (checksum) check. A manifest
  written before the file list loads unchecked and is reported "unverified"."""
  final = tmp_path / "art"
  with artifacts.building(final) as work:
    artifacts.atomic_save_npy(work / "a.npy", np.arange(1000, dtype=np.int32))
    (work / "sub").mkdir()
    (work / "sub" / "notes.json").write_text('{"x": 1}')
    (work / ".a.npy.tmp123.npy").write_bytes(b"leftover of a killed write")
    artifacts.write_manifest(work, "demo", {"x": "1"})
  files = artifacts.read_manifest(final)["files"]
  assert set(files) == {"a.npy", "sub/notes.json"}
  assert files["a.npy"]["dtype"] == "int32" and files["a.npy"]["shape"] == [1000]
  assert files["a.npy"]["bytes"] == (final / "a.npy").stat().st_size
  assert files["a.npy"]["sha256"] == artifacts.file_sha256(final / "a.npy")
  artifacts.check_manifest(final, {"x": "1"}, "hint", rebuild="python -m x")

  def damaged(damage: Callable[[Path], None], name: str = "a.npy") -> str:
    copy = Path(shutil.copytree(final, tmp_path / f"copy{len(list(tmp_path.iterdir()))}"))
    damage(copy / name)
    with pytest.raises(UserError) as err:
      artifacts.check_manifest(copy, {"x": "1"}, "hint", rebuild="python -m x")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"demo artifact {copy} is damaged: {name} ")
    assert msg.endswith(f"; delete {copy} and rerun (or: python -m x)")
    return msg.split(" is damaged: ", 1)[1].split(";")[0]

  size = files["a.npy"]["bytes"]
  assert damaged(_truncate) == f"a.npy has {size - 40} bytes, its manifest says {size}"
  assert damaged(_append) == f"a.npy has {size + 40} bytes, its manifest says {size}"
  assert damaged(_truncate, "sub/notes.json").startswith("sub/notes.json has ")
  assert damaged(lambda p: p.unlink()) == "a.npy is missing"
  assert damaged(lambda p: np.save(p, np.arange(1000, dtype=np.float32))) == \
      "a.npy holds float32 [1000], its manifest says int32 [1000]"
  flipped = Path(shutil.copytree(final, tmp_path / "flipped"))
  _flip_bit(flipped / "a.npy")
  artifacts.check_manifest(flipped, {"x": "1"}, "hint")  # the cheap check cannot see it
  with pytest.raises(UserError, match="a.npy does not match the sha256 its manifest records"):
    with artifacts.verification():
      artifacts.check_manifest(flipped, {"x": "1"}, "hint")

  legacy = Path(shutil.copytree(final, tmp_path / "legacy"))
  manifest = artifacts.read_manifest(legacy)
  del manifest["files"]
  artifacts.atomic_write_text(legacy / artifacts.MANIFEST, json.dumps(manifest))
  _truncate(legacy / "a.npy")
  with artifacts.verification() as report:
    artifacts.check_manifest(legacy, {"x": "1"}, "hint")  # unchecked, not refused
  assert [(status, d) for _, d, status, _ in report] == [("unverified", legacy)]


def _interrupted_shards(directory: Path, rows: np.ndarray, done: int) -> None:
  """A sharded build of `rows` (8 a shard) that fails after `done` shards."""
  def compute(s0, s1):
    if s0 >= 8 * done:
      raise RuntimeError("interrupted")
    return {"x": rows[s0:s1], "y": rows[s0:s1, 0].astype(np.int64)}
  with pytest.raises(RuntimeError, match="interrupted"):
    shards.sharded_rows(directory, len(rows), 8, compute, desc="test")


@pytest.mark.parametrize("damage", [_truncate, _append, _flip_bit],
                         ids=["truncated", "resized", "bit_flipped"])
def test_damaged_shard_is_recomputed_on_resume(damage, tmp_path, capsys):
  """An interrupted sharded build left 3 shards; one of them is damaged. The rerun checks
  every kept shard against the sizes and sha256 its done-marker recorded, recomputes the
  damaged one (and the unfinished ones) and joins the same arrays as a clean build; a
  damaged joined array found by a rerun is recomputed too."""
  rows = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
  _interrupted_shards(tmp_path, rows, done=3)
  damage(tmp_path / "shards" / "00001.x.npy")
  calls = []

  def compute(s0, s1):
    calls.append(s0)
    return {"x": rows[s0:s1], "y": rows[s0:s1, 0].astype(np.int64)}

  capsys.readouterr()
  out = shards.sharded_rows(tmp_path, 40, 8, compute, desc="test")
  assert calls == [8, 24, 32]
  assert f"shard 1 of {tmp_path} is damaged (00001.x.npy " in capsys.readouterr().out
  np.testing.assert_array_equal(out["x"], rows)
  np.testing.assert_array_equal(out["y"], rows[:, 0].astype(np.int64))
  listing = json.loads((tmp_path / shards.LISTING).read_text())
  assert listing["x"]["sha256"] == artifacts.file_sha256(tmp_path / "x.npy")

  del out
  damage(tmp_path / "x.npy")  # joined, but not yet committed when the build was stopped
  calls.clear()
  out = shards.sharded_rows(tmp_path, 40, 8, compute, desc="test")
  assert calls == [0, 8, 16, 24, 32] and "recomputing its arrays" in capsys.readouterr().out
  np.testing.assert_array_equal(out["x"], rows)


def test_verify_reports_every_artifact_of_a_config(retro):
  """`python -m retrieval.verify` finds every artifact tiny_retro uses and checks all of
  their checksums: all OK on an intact cache (the damaged case is a bad-input case)."""
  report = verify_lib.verify(configs.load("tiny_retro", retro))
  kinds = [kind for kind, _, _, _ in report]
  assert kinds == ["tokenizer", "dataset", "embeddings", "embeddings", "embeddings", "index",
                   neighbours.ARTIFACT], report  # chunk embeddings: train, validation, test
  assert all(status == "ok" and not detail for _, _, status, detail in report), report


# --- 4. divergence ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad_step", [6, 8], ids=["between_checkpoints", "at_a_checkpoint"])
def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(bad_step, data, tmp_path,
                                                                   monkeypatch):
  """Step `bad_step` returns a NaN loss and NaN parameters: training stops naming it, the
  NaN state is never saved (not even at a checkpoint step), step 4 stays the latest."""
  make_train_step = loop.make_train_step

  def poisoned(*args, **kwargs):
    step_fn, calls = make_train_step(*args, **kwargs), []

    def run(state, batch):
      state, metrics = step_fn(state, batch)
      calls.append(1)
      if len(calls) == bad_step:
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
      return state, metrics

    return run

  monkeypatch.setattr(loop, "make_train_step", poisoned)
  handlers = _handlers()
  with pytest.raises(UserError) as err:
    train.train_and_evaluate(configs.load("tiny_transformer", [*data, *TRAIN]), str(tmp_path))
  assert _handlers() == handlers  # restored on the error path too
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith(f"training diverged at step {bad_step}: loss is nan")
  assert "the bad state was not saved" in msg and "checkpoint (step 4) is kept" in msg
  assert _steps(tmp_path) == [4] and _tmp_step_dirs(tmp_path) == []
  assert all(np.isfinite(p).all() for p in _params(tmp_path))
  assert _logged_step(tmp_path) < bad_step  # the bad step's metrics are not logged as good


# --- 5. disk full -------------------------------------------------------------------------------

def test_disk_full_during_save_keeps_the_previous_checkpoint(data, straight, tmp_path,
                                                            monkeypatch, capsys):
  """The writer fails with ENOSPC at step 8: one line says so; step 4 is intact and a rerun
  resumes from it to the same parameters."""
  save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if "/8.orbax-checkpoint-tmp/" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await save_fn(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  config = configs.load("tiny_transformer", [*data, *TRAIN])
  with pytest.raises(UserError) as err:
    train.train_and_evaluate(config, str(tmp_path))
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith("the disk is full: the checkpoint of step 8 could "
                                            f"not be written to {tmp_path / 'checkpoints'}")
  assert "the checkpoint of step 4 is intact" in msg and "rerun the same command" in msg
  assert _steps(tmp_path) == [4] and _tmp_step_dirs(tmp_path) == []
  monkeypatch.undo()
  capsys.readouterr()
  train.train_and_evaluate(config, str(tmp_path))
  assert "resuming from step 4" in capsys.readouterr().out
  _assert_same_params(tmp_path, straight)


def test_disk_full_on_a_real_full_filesystem(tmp_path):
  """Checkpoints of incompressible 400 KB arrays into a 1 MiB tmpfs until it is full."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           capture_output=True).returncode == 0 if os.geteuid() == 0 else False
  if not mounted:
    pytest.skip("mounting a tmpfs needs root")
  try:
    w = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    tree = {"params": {"w": jnp.asarray(w)}}
    ckpt = checkpoint.Checkpoints(disk, keep=3)
    with pytest.raises(UserError) as err:
      for step in range(1, 10):
        ckpt.save(step, tree, {})
        ckpt.wait_until_finished()
    ckpt.close()
    full = int(re.search(r"checkpoint of step (\d+) could not be written", str(err.value))[1])
    assert full > 1 and f"the checkpoint of step {full - 1} is intact" in str(err.value)
    assert _steps(disk) == list(range(1, full)) and _tmp_step_dirs(disk) == []
    np.testing.assert_array_equal(checkpoint.load_params(disk)["w"], w)
  finally:
    subprocess.run(["umount", str(disk)], check=True)


# --- 6. bad inputs: one line, exit 2, no traceback, nothing lost ---------------------------------

def _copy(workdir: Path, tmp_path: Path) -> Path:
  return Path(shutil.copytree(workdir, tmp_path / "run"))


def _tamper(directory: Path, key: str) -> None:
  """Rewrites a manifest input hash, as if the artifact had been built from other inputs."""
  manifest = artifacts.read_manifest(directory)
  manifest["inputs"][key] = "0" * 16
  artifacts.atomic_write_text(directory / artifacts.MANIFEST, json.dumps(manifest))


def _truncate_state(workdir: Path, step: int) -> None:
  for path in Path(checkpoint.checkpoint_dir(workdir) / str(step) / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:10])


def _corpus_case(files: dict[str, bytes]) -> Callable:
  def setup(request, tmp_path):
    for name, content in files.items():
      (tmp_path / "corpus").mkdir(exist_ok=True)
      (tmp_path / "corpus" / name).write_bytes(content)
    data = request.getfixturevalue("data")
    return ["train.py", "--config", "tiny_transformer", "--workdir", str(tmp_path / "run"),
            *_cli([*data, f"data.corpus={tmp_path / 'corpus'}/*.txt"])], None
  return setup


def _retro_case(kind: str, key: str) -> Callable:
  def setup(request, tmp_path):
    retro = request.getfixturevalue("retro")
    cache = Path(shutil.copytree(dict(o.split("=", 1) for o in retro)["data.cache_dir"],
                                 tmp_path / "cache"))
    [built] = [p for p in (cache / kind).iterdir() if artifacts.read_manifest(p)]
    _tamper(built, key)
    return ["train.py", "--config", "tiny_retro", "--workdir", str(tmp_path / "run"),
            *_cli([*retro, f"data.cache_dir={cache}"])], cache
  return setup


def _damaged_case(kind: str, name: str, damage: Callable[[Path], None],
                  script: str = "train.py") -> Callable:
  """A copy of tiny_retro's cache in which `name` of the `kind` artifact is damaged."""
  def setup(request, tmp_path):
    retro = request.getfixturevalue("retro")
    cache = Path(shutil.copytree(dict(o.split("=", 1) for o in retro)["data.cache_dir"],
                                 tmp_path / "cache"))
    built = min(p for p in (cache / kind).iterdir() if artifacts.read_manifest(p))
    damage(built / name)
    workdir = ["--workdir", str(tmp_path / "run")] if script == "train.py" else []
    return [script, "--config", "tiny_retro", *workdir,
            *_cli([*retro, f"data.cache_dir={cache}"])], cache
  return setup


def _knn_case(request, tmp_path):
  run = request.getfixturevalue("knn_run")
  cache = Path(json.loads((run / "config.json").read_text())["data"]["cache_dir"])
  [store] = (cache / knn_datastore.ARTIFACT).iterdir()
  _tamper(store, "model")
  return ["eval.py", "--workdir", str(run)], run


def _checkpoint_case(script: str, *argv: str, truncate: bool = False) -> Callable:
  def setup(request, tmp_path):
    data = request.getfixturevalue("data")
    workdir = _copy(request.getfixturevalue("straight"), tmp_path)
    if truncate:
      _truncate_state(workdir, STEPS)
    config_args = _cli([*data, *TRAIN]) if script == "train.py" else []
    return [script, "--workdir", str(workdir), *argv, *config_args], workdir
  return setup


def _empty_workdir_case(request, tmp_path):
  (tmp_path / "run").mkdir()
  return ["eval.py", "--workdir", str(tmp_path / "run")], tmp_path / "run"


# case id -> (setup(request, tmp_path) -> (argv, directory that must not change), words)
CASES = {
    "unknown_config": (lambda r, t: (["train.py", "--config", "retro_smal"], None),
                       "unknown config 'retro_smal'; choose one of:"),
    "missing_field": (lambda r, t: (["train.py", "--config", "tiny_retro",
                                     "--config.train.stepz=1"], None),
                      "config has no field 'train.stepz'; fields here:"),
    "wrong_type": (lambda r, t: (["train.py", "--config", "tiny_retro",
                                  "--config.train.steps=ten"], None),
                   "--config.train.steps='ten': expected int"),
    "impossible_value": (lambda r, t: (["train.py", "--config", "tiny_retro",
                                        "--config.data.batch_size=0"], None),
                         "data.batch_size=0 must be > 0; set --config.data.batch_size"),
    "missing_corpus": (_corpus_case({}), "no files match"),
    "empty_corpus": (_corpus_case({"a.txt": b"", "b.txt": b"  \n"}),
                     "has no non-empty documents"),
    "short_corpus": (_corpus_case({"a.txt": b"To be.", "b.txt": b"Or not.", "c.txt": b"Ay."}),
                     "fewer than one sequence of data.seq_len+1=129; lower --config.data.seq_len"),
    "non_utf8": (_corpus_case({"a.txt": b"caf\xe9 au lait", "b.txt": b"tea"}),
                 "a.txt is not UTF-8 (byte 0xe9 at offset 3)"),
    "neighbours_other_tokenizer": (_retro_case(neighbours.ARTIFACT, "tokenizer"),
                                   "stale retro_neighbours at"),
    "index_other_embedder": (_retro_case("index", "embeddings"), "stale index at"),
    "knn_datastore_other_checkpoint": (_knn_case, "stale knn_datastore at"),
    "truncated_artifact_file": (_damaged_case(neighbours.ARTIFACT, "train/neighbours.npy",
                                              _truncate),
                                "is damaged: train/neighbours.npy has"),
    "resized_artifact_file": (_damaged_case("datasets", "train.tokens.npy", _append),
                              "is damaged: train.tokens.npy has"),
    "bit_flipped_artifact_verify": (_damaged_case("embeddings", "embeddings.npy", _flip_bit,
                                                  "retrieval.verify"),
                                    "is damaged: embeddings.npy does not match the sha256 its "
                                    "manifest records"),
    "truncated_checkpoint_eval": (_checkpoint_case("eval.py", truncate=True),
                                  "is truncated, corrupt or from another config"),
    "truncated_checkpoint_train": (_checkpoint_case("train.py", "--config", "tiny_transformer",
                                                    truncate=True),
                                   "to fall back to the checkpoint of step 8"),
    "other_model_type": (_checkpoint_case("train.py", "--config", "tiny_knnlm"),
                         "holds a checkpoint of model 'transformer', this config trains "
                         "'knnlm'"),
    "other_model_shape": (_checkpoint_case("train.py", "--config", "tiny_transformer",
                                           "--config.model.width=64"),
                          "holds a checkpoint with model.width=32, this config has "
                          "model.width=64"),
    "eval_empty_workdir": (_empty_workdir_case, "no checkpoints in"),
}


def _snapshot(directory: Path | None) -> dict[str, tuple[int, int]] | None:
  """Size and mtime of every file, but the lock file: each run that takes the lock (such
  as a train.py that then finds a bad checkpoint) records itself there."""
  if directory is None:
    return None
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*"))
          if p.is_file() and p != lock_lib.lock_path(directory)}


BATCH_DRIVER = """
import json, os, runpy, sys, traceback
jobs, codes, results = sys.argv[1], sys.argv[2], {}
for case, argv, out, err in json.load(open(jobs)):
  for module in list(sys.modules.values()):  # each case shows its warnings, as alone
    getattr(module, "__warningregistry__", {}).clear()
  saved = os.dup(1), os.dup(2)
  with open(out, "wb") as o, open(err, "wb") as e:
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(o.fileno(), 1); os.dup2(e.fileno(), 2)
    sys.argv = list(argv)
    try:
      if argv[0].endswith(".py"):
        runpy.run_path(argv[0], run_name="__main__")
      else:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as exit:
      code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
  results[case] = code
json.dump(results, open(codes, "w"))
"""


@pytest.fixture(scope="module")
def bad_inputs(request, tmp_path_factory) -> dict[str, dict]:
  """case -> its exit code, stderr, and the directories to check, for the selected cases.

  Every command line runs in one subprocess, one after another: a case needs its own
  process only for the exit, and importing JAX and the libraries in 15 processes cost a
  minute. Each case still gets its own stdout, stderr (file descriptors 1 and 2), exit
  code and a fresh `__main__`."""
  selected = [item.callspec.params["case"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_input_is_one_line_exit_2"]
  root = tmp_path_factory.mktemp("bad_inputs")
  jobs, cases = [], {}
  for case in dict.fromkeys(selected):
    tmp_path = root / case
    tmp_path.mkdir()
    argv, kept = CASES[case][0](request, tmp_path)
    cases[case] = {"tmp_path": tmp_path, "kept": kept, "before": _snapshot(kept)}
    jobs.append([case, argv, str(tmp_path / "stdout"), str(tmp_path / "stderr")])
  (root / "jobs.json").write_text(json.dumps(jobs))
  proc = subprocess.run([sys.executable, "-c", BATCH_DRIVER, str(root / "jobs.json"),
                         str(root / "codes.json")], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  codes = json.loads((root / "codes.json").read_text())
  for case, info in cases.items():
    info["code"] = codes[case]
    info["stderr"] = (info["tmp_path"] / "stderr").read_text()
    info["after"] = _snapshot(info["kept"])
  return cases


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, bad_inputs):
  _, words = CASES[case]
  got = bad_inputs[case]
  stderr, tmp_path, kept = got["stderr"], got["tmp_path"], got["kept"]
  assert got["code"] == 2, stderr[-3000:]
  assert "Traceback" not in stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], stderr
  assert got["after"] == got["before"]  # nothing written, moved or deleted
  if kept != tmp_path / "run":
    assert not (tmp_path / "run").exists()  # a failed start leaves no workdir behind


# --- 7. two writers on one workdir: the lock -------------------------------------------------

def _contents(workdir: Path) -> dict[str, bytes]:
  """Every file's bytes, the lock file included, but TensorBoard's event files: the paused
  holder's TensorBoard thread flushes them on its own clock."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file() and metrics_lib.TENSORBOARD_DIR not in p.relative_to(workdir).parts}


@pytest.fixture(scope="module")
def paused_run(data, tmp_path_factory):
  """A real `train.py` holding its workdir's lock, paused once its step-8 checkpoint is on
  disk (steps 1-8 in metrics.jsonl); yields (workdir, argv, process). The tests below use it
  in file order: the last one kills it."""
  root = tmp_path_factory.mktemp("locked")
  workdir = root / "run"
  argv = ["--config", "tiny_transformer", "--workdir", str(workdir), *_cli([*data, *TRAIN])]
  code = DRIVER.format(patch=PAUSE_AFTER_SAVE)
  with open(root / "stderr", "w") as err:
    holder = subprocess.Popen([sys.executable, "-c", code, "train.py", *argv], cwd=ROOT,
                              env={**ENV, "PAUSE_AFTER_SAVE": "8"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    for line in holder.stdout:  # its config and artifact summary, then "paused"
      if line == "paused\n":
        break
    else:
      pytest.fail(f"train.py exited with {holder.wait()} before pausing: "
                  f"{(root / 'stderr').read_text()[-3000:]}")
    yield workdir, argv, holder
  finally:
    holder.kill()
    holder.wait()


def test_lock_second_writer_stops_and_changes_nothing(paused_run):
  """A second train.py on a workdir being trained: one line naming the holder's pid and
  host, exit code 2, and every file of the workdir byte-identical (no metrics truncation,
  no checkpoint cleanup, no config.json rewrite, the lock file still naming the holder)."""
  workdir, argv, holder = paused_run
  assert holder.poll() is None, "the holder is gone (run the lock tests in file order)"
  before = _contents(workdir)
  assert {"config.json", "metrics.jsonl", ".lock", "checkpoints/8/meta/metadata"} <= set(before)
  second = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 2, second.stderr[-3000:]
  assert "Traceback" not in second.stderr
  [line] = second.stderr.strip().splitlines()
  assert line.startswith(f"error: {workdir} is being trained by another process (pid "
                         f"{holder.pid} on host {socket.gethostname()}, since "), line
  assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: python train\.py --config "
                   r"tiny_transformer --workdir ", line), line
  assert line.endswith("); wait for it to finish or stop it, or use another --workdir"), line
  assert _contents(workdir) == before
  assert holder.poll() is None  # the first run is untouched too


def test_lock_readers_work_while_training(paused_run):
  """Readers never take the lock: they load the latest whole checkpoint while a run trains
  (orbax lists only steps renamed into place, never a `.orbax-checkpoint-tmp` one)."""
  workdir, _, holder = paused_run
  assert holder.poll() is None, "the holder is gone (run the lock tests in file order)"
  config, params = train.load_checkpoint(workdir)
  assert config.train.steps == STEPS and jax.tree.leaves(params)
  result = eval_lib.evaluate(workdir, batches=1, write=False, overlap=False)
  assert result["step"] == 8 and math.isfinite(result["loss"])
  assert holder.poll() is None


def test_lock_is_released_when_the_holder_is_killed(paused_run, straight, capsys):
  """SIGKILL the paused holder: no stale lock; the same command resumes from step 8 and
  ends bit-identical to the uninterrupted run."""
  workdir, argv, holder = paused_run
  holder.kill()
  assert holder.wait() == -signal.SIGKILL
  assert f'"pid": {holder.pid}' in lock_lib.lock_path(workdir).read_text()  # still written
  capsys.readouterr()
  train.main(argv)
  assert "resuming from step 8" in capsys.readouterr().out
  _assert_same_params(workdir, straight)
  assert _losses(workdir) == _losses(straight)
  assert f'"pid": {os.getpid()}' in lock_lib.lock_path(workdir).read_text()


def test_lock_in_one_process(tmp_path, monkeypatch, capsys):
  """The lock without training: a second holder in the same process is refused too (flock
  is per open file), release frees it; processes other than 0 and filesystems without flock
  go on without it."""
  workdir = tmp_path / "new" / "run"
  with lock_lib.RunLock(workdir) as first:
    first.acquire()  # creates the workdir, and nothing else
    assert first.held and [p.name for p in workdir.iterdir()] == [lock_lib.LOCK_FILE]
    written = lock_lib.lock_path(workdir).read_bytes()
    with pytest.raises(UserError, match=rf"\(pid {os.getpid()} on host "):
      lock_lib.RunLock(workdir).acquire()
    assert lock_lib.lock_path(workdir).read_bytes() == written
  assert not first.held
  with lock_lib.RunLock(workdir) as again:
    again.acquire()
    assert again.held

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  other = lock_lib.RunLock(tmp_path / "other")
  other.acquire()
  assert not other.held and not (tmp_path / "other").exists()
  monkeypatch.undo()

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(lock_lib.fcntl, "flock", no_flock)
  unlocked = lock_lib.RunLock(tmp_path / "nfs")
  unlocked.acquire()
  assert not unlocked.held
  [warning] = capsys.readouterr().err.strip().splitlines()
  assert warning.startswith("warning: cannot lock ") and "is not detected" in warning


# --- 8. the table in README.md -----------------------------------------------------------------

def _table_rows() -> list[list[str]]:
  section = DOC.read_text().split("## What happens when...", 1)[1].split("\n## ", 1)[0]
  rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
          for line in section.splitlines() if line.startswith("| ")]
  return rows[1:]  # the header


def test_reliability_table_is_backed_by_tests():
  """Every row names a test of this file; every bad-input case has a row quoting its message."""
  here = sys.modules[__name__]
  rows = _table_rows()
  assert rows
  quoted = {}
  for row in rows:
    assert len(row) == 4, row
    test_ids = re.findall(r"`(test_\w+)(?:\[(\w+)\])?`", row[3])
    assert test_ids, f"row without a test: {row}"
    for name, param in test_ids:
      assert callable(getattr(here, name, None)), f"{name} (in {DOC.name}) is not a test here"
      if name == "test_bad_input_is_one_line_exit_2":
        assert param in CASES, f"{param} is not a case of {name}"
        quoted[param] = row[1]
  assert set(quoted) == set(CASES), f"cases without a row: {sorted(set(CASES) - set(quoted))}"
  for case, (_, words) in CASES.items():
    assert words in quoted[case], f"the row of {case} does not quote {words!r}"
