"""End to end: train + evaluate every model on a tiny synthetic corpus (flax-examples style),
and learning. (Exact resume in a fresh process and REALM's index refresh:
tests/test_resume.py; checkpoints moved across device counts: tests/test_training_core.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

import configs
from common.errors import UserError
import synthetic
import eval as eval_lib
import train
from data import corpora, dataset
from retrieval import build, datastore
from training import metrics as metrics_lib
from training.evaluation import weighted_perplexity

MODELS = ["transformer", "retro", "realm", "knnlm", "incontext"]


@pytest.fixture(scope="session")
def corpus_overrides(tmp_path_factory) -> list[str]:
  return synthetic.corpus_overrides(tmp_path_factory.mktemp("e2e"))


def _config(name: str, overrides: list[str], *extra: str):
  return configs.load(name, [*overrides, *extra])


@pytest.fixture(scope="session")
def second_edition(corpus_overrides, tmp_path_factory) -> str:
  """A datastore corpus holding a copy of every document as `edition2/<name>` (jsonl)."""
  cfg = _config("tiny_retro", corpus_overrides)
  path = tmp_path_factory.mktemp("edition") / "edition2.jsonl"
  path.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n"
                          for d in corpora.load_corpus(cfg.data.corpus)))
  return str(path)


@pytest.fixture(scope="session")
def chunk_overlaps() -> dict[tuple, dict[str, np.ndarray]]:
  """(K, R) of the reference -> model -> the overlap of its evaluated chunks (filled as the
  models are evaluated)."""
  return {}


@pytest.mark.parametrize("model", MODELS)
def test_train_50_steps_learns_then_eval(model, corpus_overrides, second_edition, chunk_overlaps,
                                         tmp_path, capsys):
  """Train (loss falls well below its start), checkpoint, and evaluate the checkpoint: with
  overlap buckets for every family, against the same RETRO neighbours."""
  cfg = _config(f"tiny_{model}", corpus_overrides, "train.steps=50", "train.warmup_steps=5",
                "train.learning_rate=0.003", "train.log_every=1", "train.eval_every=25",
                "train.checkpoint_every=25")
  final = train.train_and_evaluate(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
            if "train/loss" in r]
  assert len(losses) == 50 and final["step"] == 50
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:2]), losses
  assert (tmp_path / "loss.png").exists()

  knn = {"k": 4} if model == "knnlm" else None
  result = eval_lib.evaluate(tmp_path, knn=knn)
  assert result["step"] == 50 and result["tokens"] == final["eval/tokens"]
  assert result["perplexity"] == pytest.approx(final["eval/perplexity"], rel=1e-4)
  buckets = {b["bucket"]: b for b in result["overlap_buckets"]}
  assert sum(b["tokens"] for b in buckets.values()) == result["tokens"]
  assert result["chunks"].tokens_SxU.sum() == result["tokens"]
  written = json.loads((tmp_path / "eval_validation.json").read_text())
  assert "chunks" not in written and written["overlap_buckets"] == result["overlap_buckets"]
  same_ref = chunk_overlaps.setdefault(
      (result["overlap"]["neighbours"], result["overlap"]["neighbour_len"]), {})
  for other, seen in same_ref.items():  # the same reference: the same chunks and overlaps
    np.testing.assert_array_equal(result["chunks"].overlap_SxU, seen, err_msg=other)
  same_ref[model] = result["chunks"].overlap_SxU
  if model in ("retro", "incontext"):
    off = eval_lib.evaluate(tmp_path, retrieval=False)
    assert off["perplexity"] == pytest.approx(final["eval/no_retrieval/perplexity"], rel=1e-4)
    assert off["perplexity"] != result["perplexity"]
  if model == "transformer":  # a baseline evaluated as In-Context RALM, no retraining
    as_ralm = {"model": "incontext", "overrides": ["model.incontext.stride=32"], "write": False}
    on = eval_lib.evaluate(tmp_path, k=1, **as_ralm)
    off = eval_lib.evaluate(tmp_path, retrieval=False, **as_ralm)
    assert (on["model"], on["k"], on["tokens"]) == ("incontext", 1, result["tokens"])
    assert off["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)  # the decoder
    assert np.isfinite(on["perplexity"]) and on["perplexity"] != off["perplexity"]
    with pytest.raises(UserError, match="do not fit model 'retro'"):
      eval_lib.evaluate(tmp_path, model="retro", write=False)
    capsys.readouterr()
    [row] = eval_lib.main(["--workdir", str(tmp_path), "--max-overlap", "0.125"])
    assert row["max_overlap"] == 0.125
    assert row["tokens"] == buckets["0"]["tokens"] + buckets["(0, 0.125]"]["tokens"]
    out = capsys.readouterr().out
    assert "by overlap with 2 RETRO neighbours of 128 tokens" in out and "(0.5, 1]" in out
    [written] = json.loads((tmp_path / "eval_validation.json").read_text())
    assert written["max_overlap"] == 0.125 and "chunks" not in written
  if model == "retro":  # the paper's filtered evaluation: only chunks of overlap 0
    low = eval_lib.evaluate(tmp_path, max_overlap=0.0, write=False)
    assert low["tokens"] == buckets["0"]["tokens"] < result["tokens"]
    assert low["perplexity"] == pytest.approx(buckets["0"]["perplexity"], rel=1e-5)
    kept, dropped = (eval_lib.evaluate(tmp_path, datastore=second_edition, drop_heldout=drop,
                                       write=False) for drop in (False, True))
    assert (kept["datastore_drop_heldout"], dropped["datastore_drop_heldout"]) == (False, True)
    assert kept["perplexity"] != dropped["perplexity"]  # different neighbours were read
  if model != "transformer":  # an opt-out, no retraining: beside the full datastore
    gone = "doc0[0-4]"  # about half the training documents: every row reads other text
    removed = sorted(d for d in dataset.prepare(cfg).train.doc_ids if d < "doc05")
    quick = {"batches": 1, "overlap": False, "write": False}
    if model == "knnlm":
      without = eval_lib.evaluate(tmp_path, knn=knn, without=[gone], **quick)
      assert without["knn_without"]["removed"] == removed
      assert without["knn_without"]["removed_entries"] > 0
      full = eval_lib.evaluate(tmp_path, knn=knn, **quick)
      assert without["knn"]["perplexity"] != full["knn"]["perplexity"]
    else:
      if model == "retro":  # the command line: the family's rows, then full and without
        rows = eval_lib.main(["--workdir", str(tmp_path), "--without", gone, "--no-overlap",
                              "--batches", "1"])
        full, without = rows[-2:]
        assert f"without {gone}" in without["variant"]
      else:
        full, without = (eval_lib.evaluate(tmp_path, datastore=datastore.TRAIN_DOCUMENTS,
                                           without=w, **quick) for w in ((), [gone]))
      assert np.isfinite(without["perplexity"])
      assert full["datastore_edits"] == [] and full["datastore"] == datastore.TRAIN_DOCUMENTS
      assert [e["removed"] for e in without["datastore_edits"]] == [removed]
      assert without["datastore_version"] != full["datastore_version"]
      assert without["perplexity"] != full["perplexity"]
  if model == "knnlm":
    assert sum(b["tokens"] for b in result["knn"]["overlap_buckets"]) == result["tokens"]
    sweep = result["knn"]["sweep"]
    assert sweep[0]["lam"] == 0.0
    assert sweep[0]["perplexity_exact"] == pytest.approx(result["perplexity"], rel=1e-4)
    # lam=1 is pure kNN: tokens outside the k neighbours make it inf, never nan.
    assert not np.isnan([[r["perplexity_exact"], r["perplexity_approximate"]] for r in sweep]).any()
    assert (tmp_path / "knn_sweep.png").exists()


def test_drop_heldout_removes_other_editions_of_validation_documents(corpus_overrides,
                                                                     second_edition):
  """Kept, the copy of a held-out document is the nearest neighbour of half the validation
  chunks (leakage; by chance it would be 1 in 5: 2 of the 10 documents are validation
  documents); dropped, the datastore holds no copy of a validation or test document."""
  name = lambda doc_id: doc_id.rsplit("/", 1)[-1]  # noqa: E731
  top1_heldout = {}
  for drop in (False, True):
    cfg = _config("tiny_retro", corpus_overrides, f"retrieval.datastore={second_edition}",
                  f"retrieval.datastore_drop_heldout={drop}")
    prepared = dataset.prepare(cfg)
    store = datastore.load_datastore(cfg, prepared).split
    heldout = {name(i) for i in prepared.validation.doc_ids}
    tested = {name(i) for i in prepared.test.doc_ids}
    stored = {name(i) for i in store.doc_ids}
    assert {name(i) for i in prepared.train.doc_ids} <= stored
    assert not (heldout | tested) & stored if drop else (heldout | tested) <= stored
    retrieved = build.build_retrieval(cfg, prepared, synthetic.RETRO_REQUEST)
    ids = retrieved.arrays["validation"]["neighbour_ids"]
    top1_doc = np.asarray(store.chunk_doc())[np.asarray(ids)[..., 0].ravel()]
    top1_heldout[drop] = np.mean([name(store.doc_ids[d]) in heldout for d in top1_doc])
  assert top1_heldout[False] >= 0.5 and top1_heldout[True] == 0.0, top1_heldout


def test_weighted_perplexity_skips_padding():
  """Padding (weight 0) with log p = -inf (pure kNN at lam=1) is left out, not 0 * -inf = nan;
  a real token with log p = -inf makes the perplexity inf."""
  logp = np.array([np.log(0.5), np.log(0.25), -np.inf])
  assert weighted_perplexity(logp, np.array([1.0, 1.0, 0.0])) == pytest.approx(np.sqrt(8.0))
  assert weighted_perplexity(logp, np.array([1.0, 1.0, 1.0])) == np.inf


# The command-line bad-input cases (unknown config, missing field, eval.py on an empty
# workdir, ...) are test_reliability.py::test_bad_input_is_one_line_exit_2.
