"""The overlap (leakage) analysis: hand-counted 8-gram overlap and r(C), the chunk u vs
neighbours of chunk u-1 alignment, filtered evaluation and bucket tables on planted
neighbours, the plot and eval.py's bad values. (Every family's `evaluate` with buckets and
eval.py --max-overlap on a trained tiny checkpoint: tests/test_train_eval.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

import configs
import eval as eval_lib
import models
from data import dataset
from models.layers import Spec
from retrieval import build, core, overlap
from training import overlap_eval, sharding


def _rows(chunk: list[int], *nbrs: list[int]) -> tuple[float, float]:
  """(overlap, r(C)) of one chunk against its neighbours (padded to one length)."""
  R = max(len(n) for n in nbrs)
  nbr_1xKxR = np.array([[list(n) + [0] * (R - len(n)) for n in nbrs]], np.int32)
  ov, lcs = overlap.overlap_rows(np.array([chunk], np.int32), nbr_1xKxR)
  return float(ov[0]), float(lcs[0])


def test_overlap_and_lcs_hand_cases():
  chunk = list(range(100, 120))  # 20 distinct tokens
  other = list(range(200, 240))
  assert _rows(chunk, other[:10] + chunk + other[10:]) == (1.0, 1.0)  # identical chunk inside
  assert _rows(chunk, other, other[::-1]) == (0.0, 0.0)  # disjoint
  # Tokens 3..12 (10) in one neighbour: 3 matching 8-grams cover those 10 tokens.
  assert _rows(chunk, other[:5] + chunk[3:13] + other[5:]) == (10 / 20, 10 / 20)
  # 0..8 in one neighbour and 6..15 in another: tokens 0..15 covered, longest 10.
  assert _rows(chunk, chunk[:9], other[:3] + chunk[6:16]) == (16 / 20, 10 / 20)
  # 7 common tokens make no 8-gram: overlap 0, r(C) 7/20.
  assert _rows(chunk, other[:4] + chunk[2:9] + other[4:]) == (0.0, 7 / 20)
  # Shared tokens in another order are no 8-gram either.
  assert _rows(chunk, chunk[::-1])[0] == 0.0


def test_padding_never_matches():
  padded = [5, 6, 7] + [0] * 13 + [8, 9, 10, 11]  # 7 real tokens
  assert _rows(padded, padded) == (0.0, 4 / 7)  # only 8-grams through padding; r(C): 8..11
  assert _rows([0] * 16, [0] * 32) == (0.0, 0.0)
  real = list(range(30, 46))
  nbr = real[:4] + [0] + real[5:]  # a padding hole in the neighbour breaks the match
  assert _rows(real, nbr) == (11 / 16, 11 / 16)  # tokens 5..15 only


def test_chunk_u_is_compared_with_the_neighbours_of_chunk_u_minus_1():
  """2 sequences of 3 chunks of 8 (one 8-gram each), K=1, R=16. Column u of sequence s
  compares its chunk u with neighbours[s, u-1]; column 3 is the next sequence's first chunk
  (the last target's); column 0 is always 0. The targets of chunk u are the tokens of that
  chunk: positions u*m-1 .. (u+1)*m-2 of the batch."""
  m, C, S = 8, 3, 2
  L = C * m
  tokens_T = (np.arange(S * L + m) + 2).astype(np.int32)  # all distinct
  chunk = lambda s, u: tokens_T[s * L + u * m:s * L + (u + 1) * m]  # noqa: E731
  nbr = np.random.default_rng(0).integers(1000, 2000, (S, C, 1, 2 * m)).astype(np.int32)
  nbr[0, 0, 0, :m] = chunk(0, 1)  # read by chunk 1: full overlap
  nbr[0, 2, 0, m:] = chunk(0, 2)  # chunk 2's own neighbour holds chunk 2: read by chunk 3
  nbr[1, :, 0, :m] = chunk(1, 0)  # chunk 0 is in every neighbour of sequence 1, read by none
  nbr[1, 2, 0, 4:4 + m] = chunk(1, 3)  # the next sequence's first chunk, read by target L-1
  ov, lcs = overlap.chunk_overlap(tokens_T, nbr, L, m)
  np.testing.assert_array_equal(ov, [[0, 1, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(lcs, [[0, 1, 0, 0], [0, 0, 0, 1]])

  split = dataset.TokenSplit(name="validation", tokens=tokens_T,
                             token_doc=np.zeros_like(tokens_T), doc_ids=["d"], seq_len=L,
                             chunk_size=m)
  targets = split.batch(np.arange(S))["targets"]
  u_L = overlap.target_chunk(L, m)
  np.testing.assert_array_equal(u_L, [0] * (m - 1) + [1] * m + [2] * m + [3])
  for s in range(S):
    for u in range(C + 1):
      want = chunk(s, u)[1:] if u == 0 else chunk(s, u)[:1] if u == C else chunk(s, u)
      np.testing.assert_array_equal(targets[s, u_L == u], want)


def test_buckets_and_sums():
  got = overlap.bucket_of(np.array([0.0, 1e-9, 0.125, 0.126, 0.25, 0.5, 0.51, 1.0]))
  np.testing.assert_array_equal(got, [0, 1, 1, 2, 2, 3, 4, 4])
  values = np.arange(2 * 8, dtype=float).reshape(2, 8)
  np.testing.assert_array_equal(overlap.chunk_sums(values, 4),  # targets 0..2, 3..6, 7
                                [[3, 18, 7], [27, 50, 15]])


# --- filtered evaluation on planted neighbours (no training, no artifacts on disk) ---------

S = 3  # sequences: with eval batches of 2, the second batch has a padding row


@pytest.fixture(scope="module")
def planted():
  """In-memory artifacts of tiny_retro whose neighbours hold known shares of the chunk after
  theirs (every bucket has a chunk), and the tiny baseline decoder with initial parameters
  scored against them (random parameters; the cheapest model to compile)."""
  config = configs.load("tiny_retro")
  m, L = config.model.chunk_size, config.data.seq_len
  K, R = config.model.num_neighbours, config.model.neighbour_len
  rng = np.random.default_rng(0)  # text and neighbours from disjoint ids: no chance matches
  tokens_T = rng.integers(2, 256, S * L + m).astype(np.int32)
  nbr = rng.integers(256, config.model.vocab_size, (S, L // m, K, R)).astype(np.int32)
  chunk = lambda s, u: tokens_T[s * L + u * m:s * L + (u + 1) * m]  # noqa: E731
  nbr[0, 0, 1, 10:10 + m] = chunk(0, 1)  # 1.0
  nbr[1, 0, 0, 3:3 + 16] = chunk(1, 1)[:16]  # 0.25
  nbr[1, 1, 1, 50:50 + 8] = chunk(1, 2)[30:38]  # 0.125 (chunk 2: the last target only)
  nbr[2, 0, 0, 0:24] = chunk(2, 1)[40:]  # 0.375
  split = dataset.TokenSplit(name="validation", tokens=tokens_T,
                             token_doc=np.zeros_like(tokens_T), doc_ids=["d"], seq_len=L,
                             chunk_size=m)
  spec = overlap_eval.reference_spec(config.model)
  retrieved = core.Retrieved(kind="retro_neighbours",
                             arrays={"validation": {"neighbours": nbr,
                                                    "neighbour_ids": np.zeros(nbr.shape[:3])}},
                             manifest={"request": dataclasses.asdict(spec)},
                             batch_keys=("neighbours",))
  prepared = dataset.Prepared(tokenizer=None, train=split, validation=split, hashes={},
                              directory=Path("."))
  artifacts = build.Artifacts(prepared=prepared, datastore=None, retrieved=retrieved, hashes={})
  ref = overlap_eval.reference(config, artifacts, "validation", S)  # its own neighbours
  baseline = configs.load("tiny_transformer").model
  s = Spec.from_config(baseline)
  example = models.get_family(s).example_batch(s, 2, L, np.random.default_rng(0))
  shapes = jax.eval_shape(lambda: models.init_params(baseline, jax.random.key(0), example))
  params = jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), shapes)
  chunk_fn = overlap_eval.make_chunk_eval_fn(baseline)
  mesh = sharding.make_mesh()

  def score(**kwargs) -> dict:
    return overlap_eval.score_split(chunk_fn, params, artifacts, "validation", 2, 0, mesh, ref,
                                    drop=("neighbours",), **kwargs)

  return ref, score


def test_planted_overlaps_fill_every_bucket(planted):
  ref, _ = planted
  np.testing.assert_array_equal(ref.overlap_SxU, [[0, 1, 0], [0, 0.25, 0.125], [0, 0.375, 0]])
  np.testing.assert_array_equal(ref.lcs_SxU, [[0, 1, 0], [0, 0.25, 0.125], [0, 0.375, 0]])
  np.testing.assert_array_equal(overlap.bucket_of(ref.overlap_SxU), [[0, 4, 0], [0, 2, 1],
                                                                     [0, 3, 0]])


def test_filtered_evaluation_and_bucket_table(planted):
  ref, score = planted
  full, everything = score(), score(max_overlap=1.0)
  none_over, low = score(max_overlap=0.0), score(max_overlap=0.125)
  for key in ("loss", "perplexity", "tokens"):
    assert everything[key] == full[key]  # max_overlap=1.0 filters nothing: exactly equal
  assert full["tokens"] == S * 128  # every target of the 3 sequences (the 4th row: padding)
  buckets = {b["bucket"]: b for b in full["overlap_buckets"]}
  assert [b["chunks"] for b in full["overlap_buckets"]] == [5, 1, 1, 1, 1]
  assert [b["tokens"] for b in full["overlap_buckets"]] == [3 * 63 + 2, 1, 64, 64, 64]
  assert sum(b["tokens"] for b in full["overlap_buckets"]) == full["tokens"]
  assert buckets["(0.25, 0.5]"]["mean_overlap"] == 0.375
  # max_overlap=0: exactly the targets of the zero-overlap chunks, scored as bucket "0".
  assert none_over["tokens"] == buckets["0"]["tokens"]
  assert none_over["loss"] == pytest.approx(buckets["0"]["loss"], rel=1e-6)
  assert [b["tokens"] for b in none_over["overlap_buckets"][1:]] == [0, 0, 0, 0]
  assert low["tokens"] == buckets["0"]["tokens"] + buckets["(0, 0.125]"]["tokens"]
  # Per-chunk arrays: the sequences evaluated (not the padding row), summing to the totals.
  chunks = full["chunks"]
  np.testing.assert_array_equal(chunks.sequence_S, np.arange(S))
  np.testing.assert_array_equal(chunks.overlap_SxU, ref.overlap_SxU)
  np.testing.assert_array_equal(chunks.tokens_SxU, [[63, 64, 1]] * S)
  assert -chunks.logprob_SxU.sum() / full["tokens"] == pytest.approx(full["loss"], rel=1e-6)
  np.testing.assert_array_equal(none_over["chunks"].tokens_SxU,
                                [[63, 0, 1], [63, 0, 0], [63, 0, 1]])
  assert "chunks" not in overlap_eval.json_ready(full)
  text = overlap_eval.format_buckets([{**full, "model": "retro", "max_overlap": None,
                                       "overlap": ref.describe()}])
  assert "(0.5, 1]" in text and f"{buckets['(0.5, 1]']['perplexity']:.3f}" in text


def test_token_buckets_sum_per_target_values(planted):
  """The kNN-LM path buckets per-target log-probs by the same chunks (padding row left out)."""
  ref, _ = planted
  logp = -np.arange(2 * 128, dtype=float).reshape(2, 128) / 100
  weights = np.ones((2, 128))
  weights[1] = 0.0  # a padding row
  rows = overlap_eval.token_buckets(logp, weights, np.array([1, -1]), ref)
  u_L = overlap.target_chunk(128, 64)
  assert [r["tokens"] for r in rows] == [63, 1, 64, 0, 0]  # sequence 1's chunks 0, 2, 1
  assert rows[2]["loss"] == pytest.approx(-logp[0, u_L == 1].mean())


def test_plot_overlap_gain(tmp_path):
  def table(ppl: list) -> list[dict]:
    return [{"bucket": b, "perplexity": p} for b, p in zip(overlap.BUCKETS, ppl)]

  rows = {"baseline": table([100, 100, 100, 100, 100]), "retro": table([99, 95, 90, 80, None])}
  overlap_eval.plot_overlap_gain(rows, "baseline", tmp_path / "gain.png")
  assert (tmp_path / "gain.png").stat().st_size > 1000


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "x"])
def test_eval_cli_rejects_a_bad_max_overlap(value, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    eval_lib.main(["--workdir", str(tmp_path), "--max-overlap", value])
  assert exit_info.value.code == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: ") and ("is outside [0, 1]; " in line or "invalid float" in line)
