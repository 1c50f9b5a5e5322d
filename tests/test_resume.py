"""Exact resume in a fresh process, and REALM's stale index refreshed while training (kept
apart from tests/test_train_eval.py so the two test workers share the end-to-end runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import configs
import eval as eval_lib
import synthetic
import train
from training import metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_overrides(tmp_path_factory) -> list[str]:
  return synthetic.corpus_overrides(tmp_path_factory.mktemp("resume"))


def _config(name: str, overrides: list[str], *extra: str):
  return configs.load(name, [*overrides, *extra])


def _params(workdir: Path):
  _, params = train.load_checkpoint(workdir)
  return jax.tree.leaves(jax.device_get(params))


def test_resume_in_fresh_process_is_exact(corpus_overrides, tmp_path):
  common = [*corpus_overrides, "train.steps=4", "train.checkpoint_every=2",
            "train.eval_every=1000", "train.log_every=1"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(_config("tiny_retro", common), str(straight))
  train.train_and_evaluate(_config("tiny_retro", common, "train.stop_after=2"), str(resumed))
  args = [sys.executable, "train.py", "--config", "tiny_retro", "--workdir", str(resumed),
          *[f"--config.{o}" for o in common]]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step 2" in proc.stdout
  for a, b in zip(_params(straight), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  loss = lambda w: {r["step"]: r["train/loss"] for r in  # noqa: E731
                    metrics_lib.read_jsonl(w / "metrics.jsonl") if "train/loss" in r}
  assert loss(straight) == loss(resumed)  # same batches at every step, same losses


def test_realm_refreshes_stale_index(corpus_overrides, tmp_path):
  cfg = _config("tiny_realm", corpus_overrides, "train.steps=5", "retrieval.refresh_every=2",
                "model.realm.doc_encoder=trainable", "train.log_every=1",
                "train.checkpoint_every=1000", "train.eval_every=1000")
  train.train_and_evaluate(cfg, str(tmp_path))
  records = [r for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
             if "train/index_age_steps" in r]
  assert [r["train/index_age_steps"] for r in records] == [0, 1, 0, 1, 0]  # refreshed
  # before steps 2 and 4; the retriever's diagnostics are logged at every step
  K = cfg.model.num_neighbours
  assert all(0 <= r["train/gold_rank"] <= K - 1 and 0 < r["train/null_prob"] < 1
             for r in records)
  refreshed = eval_lib.evaluate(tmp_path, batches=1, write=False, overlap=False)
  assert refreshed["index"] == "refreshed at step 5"  # evaluated with the index it trained on
  assert np.isfinite(refreshed["perplexity"])
  assert 0 <= refreshed["gold_rank"] <= K - 1 and 0 < refreshed["null_prob"] < 1
  assert 0 < refreshed["retrieval_entropy"] <= np.log(K + 1)
