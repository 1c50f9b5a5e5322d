"""Overlap-bucketed evaluation (the RETRO paper's leakage analysis) behind
`evaluate(..., max_overlap=)`, for every model family.

The reference is what a RETRO of this config would read: K = model.num_neighbours
neighbours of model.neighbour_len tokens per chunk of the config's datastore, asked from
the retrieval builders with a neighbours-kind `RetrievalSpec` (`reference_spec`), so every
family (a baseline, kNN-LM, REALM, In-Context RALM) and a RETRO trained on the same data
are bucketed by the same chunks. `retrieval.overlap` measures each target chunk against it.

    ref = reference(config, artifacts, "validation", num_sequences)   # ChunkOverlap
    scores = score_split(make_chunk_eval_fn(config.model), params, artifacts, "validation",
                         batch_size, max_batches, mesh, ref, max_overlap=0.125)

`make_chunk_eval_fn` runs the family's loss once per batch under `jax.vmap` over weight
masks (all tokens, each overlap bucket, each [sequence, chunk]): the model does not
depend on the weights, so it runs once and only the weighted sums are repeated. For
REALM, whose loss is a marginal over documents, a bucket's or a chunk's value is the
marginal likelihood of its tokens alone (exactly what a filtered evaluation scores), so
chunk values do not add up to the sequence's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import models
from common.errors import UserError
from data import dataset
from models.family import RetrievalSpec
from retrieval import build, overlap
from training import loop

BUCKET_KEY = "overlap_bucket"  # batch entry [B, L]: the overlap bucket of each target
NUM_BUCKETS = len(overlap.BUCKETS)
ALIGNMENT = ("chunk u (targets u*m-1 .. (u+1)*m-2) is compared with the neighbours of chunk "
              "u-1, which those positions read; chunk 0 reads none (overlap 0)")


@dataclasses.dataclass(frozen=True)
class ChunkOverlap:
  """Overlap and r(C) of every target chunk of a split's first S sequences [S, U]."""
  overlap_SxU: np.ndarray
  lcs_SxU: np.ndarray
  chunk_size: int
  neighbours: int
  neighbour_len: int
  datastore: str

  def per_target(self, index_B: np.ndarray, seq_len: int) -> np.ndarray:
    """float64 [B, L]: the overlap of each target's chunk (padding rows, index -1: 0)."""
    idx_B = np.asarray(index_B)
    rows_BxU = np.where(idx_B[:, None] >= 0, self.overlap_SxU[np.maximum(idx_B, 0)], 0.0)
    return rows_BxU[:, overlap.target_chunk(seq_len, self.chunk_size)]

  def describe(self) -> dict[str, Any]:
    return {"ngram": overlap.NGRAM, "neighbours": self.neighbours,
            "neighbour_len": self.neighbour_len, "datastore": self.datastore,
            "alignment": ALIGNMENT}


@dataclasses.dataclass(frozen=True, repr=False)
class ChunkScores:
  """Per-[sequence, chunk] results of an evaluation, for joins (e.g. of a baseline and a
  RETRO, which share `sequence_S` and the chunk axis U): the evaluated sequences, each
  target chunk's summed log-probability and scored tokens, and its overlap and r(C).
  Not JSON: `json_ready` leaves it out (its repr is one short line)."""
  sequence_S: np.ndarray
  logprob_SxU: np.ndarray
  tokens_SxU: np.ndarray
  overlap_SxU: np.ndarray
  lcs_SxU: np.ndarray

  def __repr__(self) -> str:
    return f"ChunkScores({len(self.sequence_S)} sequences x {self.tokens_SxU.shape[1]} chunks)"


def check_max_overlap(max_overlap: float | None) -> None:
  if max_overlap is not None and not 0.0 <= max_overlap <= 1.0:
    raise UserError(f"max_overlap={max_overlap} is outside [0, 1]; give the largest share of a "
                    f"chunk's tokens that may lie in 8-grams of its neighbours, e.g. 0.125")


def reference_spec(model_config: ml_collections.ConfigDict) -> RetrievalSpec:
  """RETRO's request at this config's chunk size, K and neighbour length."""
  m = model_config.chunk_size
  return RetrievalSpec(kind="neighbours", k=model_config.num_neighbours,
                       length=model_config.neighbour_len, batch_keys=("neighbours",),
                       stride=m, query_len=m)


def _asks_for(request: Mapping[str, Any] | None, spec: RetrievalSpec) -> bool:
  fields = ("kind", "k", "length", "stride", "query_len")
  return request is not None and all(request.get(f) == getattr(spec, f) for f in fields)


def reference(config: ml_collections.ConfigDict, artifacts: build.Artifacts, split: str,
              num_sequences: int) -> ChunkOverlap:
  """The overlap of the first `num_sequences` sequences of `split` with the reference
  neighbours: the artifacts' own when they are those (RETRO), else built (cached)."""
  spec = reference_spec(config.model)
  own = artifacts.retrieved
  if own is not None and split in own.arrays and _asks_for((own.manifest or {}).get("request"),
                                                           spec):
    retrieved = own
  else:
    retrieved = build.build_retrieval(config, artifacts.prepared, spec, artifacts.datastore,
                                      splits=(split,))
  part = artifacts.prepared.split(split)
  nbr_SxCxKxR = retrieved.arrays[split]["neighbours"][:num_sequences]
  overlap_SxU, lcs_SxU = overlap.chunk_overlap(part.tokens, nbr_SxCxKxR, part.seq_len,
                                               part.chunk_size)
  return ChunkOverlap(overlap_SxU, lcs_SxU, part.chunk_size, spec.k, spec.length,
                      config.retrieval.datastore or "train split")


def make_chunk_eval_fn(model_config: ml_collections.ConfigDict
                       ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Jitted (params, batch with BUCKET_KEY) -> nll and tokens in total, per bucket [G]
  and per [sequence, chunk] [B, U], from one forward pass (see the module docstring)."""
  loss_fn = models.make_loss_fn(model_config)
  m = model_config.chunk_size

  def run(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    batch = dict(batch)
    bucket_BxL = batch.pop(BUCKET_KEY)
    weights_BxL = batch["weights"]
    B, L = weights_BxL.shape
    U = L // m + 1
    chunk_L = (jnp.arange(L) + 1) // m
    row_NxBx1 = (jnp.arange(B)[:, None] == jnp.arange(B)).repeat(U, axis=0)[..., None]
    chunk_Nx1xL = jnp.tile(jnp.arange(U), B)[:, None, None] == chunk_L
    bucket_GxBxL = bucket_BxL == jnp.arange(NUM_BUCKETS)[:, None, None]
    # M = 1 + G + N masks: every target, each bucket, each [sequence, chunk].
    masks_MxBxL = jnp.concatenate([jnp.ones((1, B, L), bool), bucket_GxBxL,
                                   row_NxBx1 & chunk_Nx1xL]).astype(weights_BxL.dtype)

    def sums(mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
      aux = loss_fn(params, {**batch, "weights": weights_BxL * mask_BxL}, None)[1]
      return aux["nll_sum"], aux["tokens"]

    nll_M, tokens_M = jax.vmap(sums)(masks_MxBxL)
    n = 1 + NUM_BUCKETS
    return {"nll_sum": nll_M[0], "tokens": tokens_M[0], "bucket_nll": nll_M[1:n],
            "bucket_tokens": tokens_M[1:n], "chunk_nll": nll_M[n:].reshape(B, U),
            "chunk_tokens": tokens_M[n:].reshape(B, U)}

  return jax.jit(run)


def filter_weights(batch: dict[str, np.ndarray], overlap_BxL: np.ndarray,
                   max_overlap: float | None) -> None:
  """Zeroes the weights of targets whose chunk overlaps more than `max_overlap` (in place)."""
  if max_overlap is not None:
    batch["weights"] = batch["weights"] * (overlap_BxL <= max_overlap)


def score_split(chunk_fn: Callable, params: Any, artifacts: build.Artifacts, split: str,
                batch_size: int, max_batches: int, mesh: jax.sharding.Mesh,
                ref: ChunkOverlap, max_overlap: float | None = None,
                drop: tuple[str, ...] = (), score_from: int = 0) -> dict[str, Any]:
  """`loop.evaluate_split`'s perplexity (targets of positions >= `score_from`), scoring only
  targets of chunks with overlap <= `max_overlap` (None: all), plus `overlap_buckets` (see
  `overlap.bucket_table`) and `chunks` (`ChunkScores`)."""
  part = artifacts.prepared.split(split)
  batches = list(dataset.eval_indices(part.num_sequences, batch_size))
  if max_batches > 0:
    batches = batches[:max_batches]
  pending = []
  for idx_B in tqdm(batches, desc="eval (overlap buckets)", unit="batch", leave=False):
    batch = loop.eval_batch(artifacts, split, idx_B, score_from)
    overlap_BxL = ref.per_target(idx_B, part.seq_len)
    filter_weights(batch, overlap_BxL, max_overlap)
    batch[BUCKET_KEY] = overlap.bucket_of(overlap_BxL).astype(np.int32)
    pending.append(chunk_fn(params, loop.device_batch(batch, mesh, drop)))
  out = jax.device_get(pending)
  nll = sum(float(o["nll_sum"]) for o in out)
  tokens = sum(float(o["tokens"]) for o in out)
  idx_N = np.concatenate(batches)
  live_N = idx_N >= 0
  seq_S = idx_N[live_N]
  chunk_nll_SxU = np.concatenate([o["chunk_nll"] for o in out])[live_N].astype(np.float64)
  chunk_tokens_SxU = np.concatenate([o["chunk_tokens"] for o in out])[live_N].astype(np.float64)
  overlap_SxU, lcs_SxU = ref.overlap_SxU[seq_S], ref.lcs_SxU[seq_S]
  loss = nll / max(tokens, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
          "batches": len(batches),
          "overlap_buckets": overlap.bucket_table(
              sum(np.asarray(o["bucket_nll"], np.float64) for o in out),
              sum(np.asarray(o["bucket_tokens"], np.float64) for o in out),
              chunk_tokens_SxU.ravel(), overlap_SxU.ravel(), lcs_SxU.ravel()),
          "chunks": ChunkScores(seq_S, -chunk_nll_SxU, chunk_tokens_SxU, overlap_SxU, lcs_SxU)}


def token_buckets(logp_NxL: np.ndarray, weights_NxL: np.ndarray, index_N: np.ndarray,
                  ref: ChunkOverlap) -> list[dict]:
  """The bucket table of per-target log-probabilities (kNN-LM) of sequences `index_N`."""
  nll_NxU = overlap.chunk_sums(-np.where(weights_NxL > 0, logp_NxL, 0.0) * weights_NxL,
                               ref.chunk_size)
  tokens_NxU = overlap.chunk_sums(weights_NxL, ref.chunk_size)
  rows_N = np.maximum(np.asarray(index_N), 0)  # padding rows (-1) have weight 0
  overlap_NxU, lcs_NxU = ref.overlap_SxU[rows_N], ref.lcs_SxU[rows_N]
  bucket_N = overlap.bucket_of(overlap_NxU).ravel()
  nll_G, tokens_G = (np.bincount(bucket_N, v.ravel(), NUM_BUCKETS) for v in (nll_NxU, tokens_NxU))
  return overlap.bucket_table(nll_G, tokens_G, tokens_NxU.ravel(), overlap_NxU.ravel(),
                              lcs_NxU.ravel())


def json_ready(result: Mapping[str, Any]) -> dict[str, Any]:
  """The result without its per-chunk arrays (`chunks`), for JSON."""
  return {k: v for k, v in result.items() if k != "chunks"}


def format_buckets(results: list[dict[str, Any]]) -> str:
  """The bucket tables of evaluation results (and of their kNN-LM) as plain text."""
  lines = []
  for r in results:
    if "overlap_buckets" not in r:
      continue
    ref, label = r["overlap"], r.get("variant", r["model"])
    cap = "" if r["max_overlap"] is None else f"; scored: overlap <= {r['max_overlap']}"
    lines.append(f"by overlap with {ref['neighbours']} RETRO neighbours of "
                 f"{ref['neighbour_len']} tokens ({ref['datastore']}; chunk 0 reads none{cap}):")
    tables = [(label, r["overlap_buckets"])]
    if "overlap_buckets" in r.get("knn", {}):
      tables.append((f"{label}, kNN-LM λ={r['knn']['lam']}", r["knn"]["overlap_buckets"]))
    for name, table in tables:
      rows = [(f"  {name}", "chunks", "tokens", "loss", "perplexity", "mean r(C)")]
      for b in table:
        rows.append((f"    {b['bucket']}", str(b["chunks"]), str(int(b["tokens"])),
                     "-" if b["loss"] is None else f"{b['loss']:.4f}",
                     "-" if b["perplexity"] is None else f"{b['perplexity']:.3f}",
                     "-" if b["mean_lcs"] is None else f"{b['mean_lcs']:.3f}"))
      widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
      lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  return "\n".join(lines)


def plot_overlap_gain(rows: Mapping[str, list[dict]], baseline_label: str,
                      path: str | Path) -> None:
  """PNG at `path`: per model (label -> its `overlap_buckets`), the % change of perplexity
  against the model `baseline_label`, per overlap bucket (negative: better)."""
  from matplotlib.figure import Figure

  base = {b["bucket"]: b["perplexity"] for b in rows[baseline_label]}
  fig = Figure(figsize=(7, 4), dpi=100)
  ax = fig.add_subplot()
  x = np.arange(NUM_BUCKETS)
  for label, table in rows.items():
    if label == baseline_label:
      continue
    ppl = {b["bucket"]: b["perplexity"] for b in table}
    gain = [100.0 * (ppl[name] / base[name] - 1.0) if ppl.get(name) and base.get(name)
            else np.nan for name in overlap.BUCKETS]
    ax.plot(x, gain, marker="o", label=label)
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xticks(x, overlap.BUCKETS)
  ax.set_xlabel("8-gram overlap of the chunk with the neighbours it reads")
  ax.set_ylabel(f"perplexity vs {baseline_label} (%)")
  ax.set_title("Gain by overlap bucket")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
