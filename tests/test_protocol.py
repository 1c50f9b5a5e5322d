"""The results protocol's pieces that need no training: its configs parse, the leakage
check, and the report's statistics and targets (scripts/results.py, scripts/report.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import configs
from data import dataset
from retrieval import datastore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import report  # noqa: E402
import results  # noqa: E402
import runner as runner_lib  # noqa: E402


def _split(docs: dict[str, list[int]], m: int = 4) -> dataset.TokenSplit:
  parts = [np.asarray(t + [1], np.int32) for t in docs.values()]
  return dataset.TokenSplit(
      name="x", tokens=np.concatenate(parts), seq_len=2 * m, chunk_size=m,
      token_doc=np.repeat(np.arange(len(parts)), [len(p) for p in parts]).astype(np.int32),
      doc_ids=list(docs))


def test_leakage_finds_the_evaluated_text_not_another_edition():
  rng = np.random.default_rng(0)
  play = rng.integers(2, 90, 40).tolist()
  edition = [t + 1 if i % 3 == 0 else t for i, t in enumerate(play)]  # another spelling
  test = _split({"shakespeare/play": play})
  clean = datastore.leakage(_split({"folio/play": edition, "a/b": [5] * 30}), test)
  assert clean == {"shared_doc_ids": [], "verbatim_chunks": 0, "chunks": 10}
  copied = datastore.leakage(_split({"a/b": [5] * 7 + play[8:30]}), test)  # at any offset
  assert copied["verbatim_chunks"] == 5 and copied["shared_doc_ids"] == []  # chunks 2..6
  assert datastore.leakage(_split({"shakespeare/play": [7] * 9}), test)["shared_doc_ids"] == \
      ["shakespeare/play"]


@pytest.mark.parametrize("recipe", [results.FULL, results.QUICK])
def test_every_run_of_the_protocol_is_a_valid_config(recipe, tmp_path):
  """Each planned run's overrides (schedule, seeds, warm start, datastores) load and
  validate, and the runs that start from the baseline point at its workdir."""
  runner = results.Runner(tmp_path, recipe)
  for seed in recipe.seeds:
    runs = results.plan(runner, seed, recipe.learning_rates[0], 3.0, 0.1)
    assert ("realm_refreshed" in runs) == (seed == recipe.seeds[0])
    for row, run in runs.items():
      config = configs.load(run.config, list(run.overrides))
      assert config.seed == seed and config.eval.score_from == config.model.chunk_size - 1
      assert config.data.test_fraction > 0
      assert config.train.init_from == (str(runner.workdir(runs["base"]))
                                        if run.base else "")
      assert run.checkpoints[-1] == config.train.steps


def test_runner_trains_only_what_a_missing_evaluation_needs(tmp_path, monkeypatch):
  """Cached evaluations (committed, no checkpoints) are reused; a missing one trains its run
  and first the baseline it starts from; a cached result of another config is redone."""
  trained, evaluated = [], []

  def fake_train(config, workdir):
    trained.append(Path(workdir).name)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "metrics.jsonl").write_text('{"step": 1, "eval/perplexity": 9.0}\n')
    (Path(workdir) / "final_metrics.json").write_text("{}")
    return {}

  def fake_evaluate(workdir, **kwargs):
    evaluated.append(Path(workdir).name)
    return {"perplexity": 1.0}

  monkeypatch.setattr(runner_lib, "train_and_evaluate", fake_train)
  monkeypatch.setattr(runner_lib, "evaluate", fake_evaluate)
  runner = results.Runner(tmp_path, results.QUICK)
  runs = results.plan(runner, 0, 3e-3, 1.0, 0.1)
  runner.eval("cont/0/test", runs["cont"], split="test")
  assert trained == ["baseline_lr0.003_s0", "cont_x0.1_s0"]
  assert (tmp_path / "logs" / "cont_x0.1_s0.jsonl").exists()
  for run in (tmp_path / "runs").iterdir():  # a new sitting on a fresh machine
    (run / "final_metrics.json").unlink()
  trained.clear()
  assert runner.eval("cont/0/test", runs["cont"], split="test")["run"] == "cont_x0.1_s0"
  assert trained == [] and evaluated == ["cont_x0.1_s0"]
  changed = dataclasses.replace(runs["cont"], overrides=runs["cont"].overrides + ("eval.batches=3",))
  runner.eval("cont/0/test", changed, split="test")
  assert trained == ["baseline_lr0.003_s0", "cont_x0.1_s0"]


def _evals(values: dict[str, list[float]]) -> dict[str, dict]:
  return {f"{row}/{seed}/test": {"perplexity": p} for row, ps in values.items()
          for seed, p in enumerate(ps)}


def test_report_compares_per_seed_and_calls_targets_only_beyond_the_spread():
  evals = _evals({"cont": [100.0, 110.0, 90.0], "fit_related": [85.0, 99.0, 81.0],
                  "base": [120.0, 121.0, 119.0], "retro": [121.0, 120.0, 119.0],
                  "realm_k1": [99.0, 109.0, 89.5], "realm_k4": [98.0, 108.5, 89.0],
                  "knn": [100.0, 101.0, 99.0]})
  fit = report.change(evals, "fit_related", "cont", "test")
  np.testing.assert_allclose(fit["mean"], np.mean([-15.0, -10.0, -10.0]))
  assert fit["n"] == 3 and fit["std"] > 0
  met = {name.split(":")[0].split(" ")[0]: ok for name, _, ok in report.targets(evals)}
  assert met["RETRO-fitted"] is False  # -11.7% ± 2.9: not beyond the 10% with its spread
  assert met["RETRO"] is True  # +0.0% ± 0.8: not worse beyond the spread
  assert met["kNN-LM"] is True
  evals.update(_evals({"fit_related": [80.0, 88.0, 72.0]}))
  assert report.targets(evals)[0][2] is True
  two_seeds = {k: v for k, v in evals.items() if not k.split("/")[1] == "2"}
  assert all(met is None for _, _, met in report.targets(two_seeds))  # too few seeds
  assert report.stats([1.0])["std"] == 0.0


def test_report_renders_from_rows(tmp_path):
  """RESULTS.md and the plots from a small set of rows (as results.json holds them)."""
  evals = _evals({"base": [120.0, 121.0], "cont": [100.0, 101.0], "fit_related": [80.0, 82.0],
                  "retro": [119.0, 120.5], "retro_off": [125.0, 126.0]})
  sweep = [{"lam": lam, "perplexity_approximate": 100 - 10 * lam, "perplexity_exact": 99.0}
           for lam in (0.0, 0.25, 0.5)]
  evals["knn/0/validation"] = {"perplexity": 95.0, "lam": 0.5, "temperature": 5.0,
                               "sweeps": {"5.0": {"sweep": sweep}}}
  evals["knn/0/test"] = {"perplexity": 96.0, "lam": 0.5, "temperature": 5.0}
  evals.update({f"curve_fit_{mode}/{step}/validation": {"perplexity": 90.0 + step / 10}
                for mode in ("on", "off") for step in (10, 20)})
  rows = {"recipe": vars(results.QUICK) | {"seeds": [0, 1]}, "evals": evals, "runs": {},
          "sweep": {"perplexity": {"0.003": 120.0}, "learning_rate": 0.003},
          "fit_sweep": {"perplexity": {"1": 81.0}, "scale": 1.0},
          "warm_sweep": {"perplexity": {"0.1": 99.0}, "scale": 0.1},
          "leakage": {"training split": {"shared_doc_ids": [], "verbatim_chunks": 0,
                                         "chunks": 10}}}
  evals_dir = tmp_path / "evals"
  evals_dir.mkdir()
  overlap_SxU = np.asarray([[0.0, 0.1, 0.9], [0.0, 0.6, 0.3]])  # buckets 0, 1, 4 / 0, 4, 3
  for seed in (0, 1):
    for row, nats in (("cont", 2.0), ("fit_related", 2.0 - np.log(2.0) * (overlap_SxU > 0.5))):
      np.savez(evals_dir / f"{row}__{seed}__test.npz", sequence_S=np.arange(2),
               logprob_SxU=-nats * np.full((2, 3), 10.0), tokens_SxU=np.full((2, 3), 10.0),
               overlap_SxU=overlap_SxU, lcs_SxU=overlap_SxU)
  gains = report.overlap_gain(evals_dir, "fit_related", "cont", "test", [0, 1])
  assert [g["chunks"] for g in gains] == [2, 1, 0, 1, 2]
  assert gains[0]["change"]["mean"] == pytest.approx(0.0) and gains[2]["change"] is None
  assert gains[4]["change"]["mean"] == pytest.approx(-50.0)  # half the perplexity there
  md = report.write(rows, tmp_path, evals_dir)
  assert md.startswith("# Results") and "| RETRO from scratch, training-split datastore |" in md
  assert "Where the gain comes from" in md and (tmp_path / "overlap_gain.png").stat().st_size
  assert "-19.41% ± 0.84" in md  # fit vs cont per seed: -20% and -18.81%
  assert (tmp_path / "curves.png").stat().st_size and (tmp_path / "knn_sweep.png").stat().st_size


def test_compare_runs_plots_a_metric_of_several_workdirs(tmp_path):
  import compare_runs  # noqa: E402  (scripts/compare_runs.py)

  for name, scale in (("a", 1.0), ("b", 2.0)):
    (tmp_path / name).mkdir()
    rows = [{"step": s, "train/loss": scale / s} for s in range(10, 110, 10)]
    (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  steps, values = compare_runs.curve(tmp_path / "b", "train/loss")
  np.testing.assert_allclose(values, 2.0 / steps)
  compare_runs.main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--smooth", "2",
                     "--out", str(tmp_path / "c.png")])
  assert (tmp_path / "c.png").stat().st_size > 1000
  with pytest.raises(SystemExit, match="no 'eval/perplexity'"):
    compare_runs.curve(tmp_path / "a", "eval/perplexity")
