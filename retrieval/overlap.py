"""How much of an evaluated chunk its RETRO neighbours already hold (the paper's leakage
analysis, Borgeaud et al. 2021, section 4.4).

Target chunk u of sequence s is the sequence's tokens [u*m, (u+1)*m) of the stream; the
positions that predict them, u*m-1 .. (u+1)*m-2, read the neighbours retrieved for chunk
u-1 (RETRO's CCA), so chunk u is compared with `neighbours[s, u-1]` (K neighbours, each a
chunk + continuation of R tokens). Chunk 0 reads no neighbours: its overlap is 0. A
sequence has U = C + 1 target chunks: the last target of a sequence (position L-1) is the
first token of the next sequence's stream chunk, predicted from chunk C-1's neighbours.

    overlap_SxU, lcs_SxU = chunk_overlap(split.tokens, nbr_SxCxKxR, split.seq_len, split.chunk_size)
    bucket_SxU = bucket_of(overlap_SxU)        # index into BUCKETS

overlap: the fraction of the chunk's tokens that lie inside an 8-gram of the chunk that
also occurs in one of its K neighbours. lcs: the paper's r(C), the longest common token
substring of the chunk and a neighbour divided by the chunk's length. Both count token
ids, exactly (no hashing); padding (id 0) never matches, and a chunk's length is its
number of non-padding tokens.
"""

from __future__ import annotations

import numpy as np

NGRAM = 8
# Overlap buckets: [0], (0, 0.125], (0.125, 0.25], (0.25, 0.5], (0.5, 1].
EDGES = (0.0, 0.125, 0.25, 0.5)
BUCKETS = ("0", "(0, 0.125]", "(0.125, 0.25]", "(0.25, 0.5]", "(0.5, 1]")
_BLOCK = 256  # rows per step of the matching loop (keeps its arrays in cache)


def overlap_rows(chunks_QxM: np.ndarray, nbr_QxKxR: np.ndarray, ngram: int = NGRAM
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(overlap_Q, lcs_Q) of each chunk against its own K neighbours (see the module docstring).

  One pass of the longest-common-substring recurrence over the chunk's positions, vectorised
  over rows, neighbours and neighbour positions: run[i, k, j] is the length of the common
  substring ending at chunk token i and token j of neighbour k, so the 8-gram ending at i
  occurs in a neighbour exactly when some run[i, k, j] >= 8.
  """
  chunks_QxM = np.asarray(chunks_QxM)
  nbr_QxKxR = np.asarray(nbr_QxKxR)
  Q, M = chunks_QxM.shape
  live_Q = (chunks_QxM != 0).sum(1)
  ends_QxM = np.zeros((Q, M), bool)  # an n-gram ending at this token occurs in a neighbour
  longest_Q = np.zeros(Q, np.int64)
  query_QxM = np.where(chunks_QxM == 0, -1, chunks_QxM)  # padding equals no neighbour token
  dtype = np.uint8 if min(M, nbr_QxKxR.shape[2]) < 255 else np.int32
  for q0 in range(0, Q, _BLOCK):
    nbr = nbr_QxKxR[q0:q0 + _BLOCK]
    run, nxt = np.zeros(nbr.shape, dtype), np.zeros(nbr.shape, dtype)
    for i in range(M):
      np.add(run[..., :-1], 1, out=nxt[..., 1:])
      nxt[..., 0] = 1
      nxt *= nbr == query_QxM[q0:q0 + _BLOCK, i, None, None]
      run, nxt = nxt, run
      most = run.max(axis=(1, 2))
      np.maximum(longest_Q[q0:q0 + _BLOCK], most, out=longest_Q[q0:q0 + _BLOCK])
      ends_QxM[q0:q0 + _BLOCK, i] = most >= ngram
  # Token j is covered when an n-gram ending at j .. j+n-1 matched.
  count_QxM1 = np.pad(np.cumsum(ends_QxM, axis=1), ((0, 0), (1, 0)))
  hi_M = np.minimum(np.arange(M) + ngram, M)
  covered_QxM = count_QxM1[:, hi_M] > count_QxM1[:, :M]
  length_Q = np.maximum(live_Q, 1)
  return covered_QxM.sum(1) / length_Q, longest_Q / length_Q


def chunk_overlap(tokens_T: np.ndarray, neighbours_SxCxKxR: np.ndarray, seq_len: int,
                  chunk_size: int, ngram: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
  """(overlap_SxU, lcs_SxU) float64 of the target chunks u = 0..C of sequences 0..S-1.

  Sequence s is the stream's tokens [s*L, s*L+L] (as in `data.dataset`), its neighbours
  `neighbours_SxCxKxR[s]` (the first S sequences of a split are given). Column u compares
  tokens [s*L + u*m, s*L + (u+1)*m) (0 past the end of the stream) with the neighbours of
  chunk u-1; column 0 is 0 (chunk 0 reads none).
  """
  S, C = neighbours_SxCxKxR.shape[:2]
  m = chunk_size
  if C * m != seq_len:
    raise ValueError(f"neighbours of {C} chunks of {m} do not tile seq_len {seq_len}")
  T = len(tokens_T)
  pos_SxCxM = (np.arange(S)[:, None, None] * seq_len + np.arange(1, C + 1)[None, :, None] * m
               + np.arange(m))
  chunks_SxCxM = np.where(pos_SxCxM < T, np.asarray(tokens_T)[np.minimum(pos_SxCxM, T - 1)], 0)
  nbr_QxKxR = np.asarray(neighbours_SxCxKxR).reshape(S * C, *neighbours_SxCxKxR.shape[2:])
  overlap_Q, lcs_Q = overlap_rows(chunks_SxCxM.reshape(S * C, m), nbr_QxKxR, ngram)
  zeros_Sx1 = np.zeros((S, 1))
  return (np.concatenate([zeros_Sx1, overlap_Q.reshape(S, C)], axis=1),
          np.concatenate([zeros_Sx1, lcs_Q.reshape(S, C)], axis=1))


def target_chunk(seq_len: int, chunk_size: int) -> np.ndarray:
  """int64 [L]: the target chunk of each target position (position p predicts token p+1)."""
  return (np.arange(seq_len) + 1) // chunk_size


def chunk_sums(values_BxL: np.ndarray, chunk_size: int) -> np.ndarray:
  """[B, U]: per-position values summed over each target chunk (U = L/m + 1)."""
  B, L = values_BxL.shape
  padded_BxLm = np.pad(values_BxL, ((0, 0), (1, chunk_size - 1)))
  return padded_BxLm.reshape(B, L // chunk_size + 1, chunk_size).sum(-1)


def bucket_of(overlap: np.ndarray) -> np.ndarray:
  """Index into BUCKETS of each overlap value (same shape)."""
  return np.searchsorted(EDGES, overlap, side="left")


def bucket_table(nll_G: np.ndarray, tokens_G: np.ndarray, tokens_N: np.ndarray,
                 overlap_N: np.ndarray, lcs_N: np.ndarray) -> list[dict]:
  """One row per bucket: its name, the chunks with scored tokens in it, their tokens, loss
  and perplexity (None without tokens), and the chunks' mean overlap and mean r(C).

  Args:
    nll_G, tokens_G: summed negative log-likelihood and scored tokens per bucket.
    tokens_N, overlap_N, lcs_N: scored tokens, overlap and r(C) of every chunk.
  """
  scored_N = np.asarray(tokens_N) > 0
  bucket_N = bucket_of(np.asarray(overlap_N))
  rows = []
  for g, name in enumerate(BUCKETS):
    tokens = float(tokens_G[g])
    loss = float(nll_G[g]) / tokens if tokens > 0 else None
    sel = scored_N & (bucket_N == g)
    rows.append({"bucket": name, "chunks": int(sel.sum()), "tokens": tokens, "loss": loss,
                 "perplexity": None if loss is None else float(np.exp(min(loss, 50.0))),
                 "mean_overlap": float(np.mean(overlap_N[sel])) if sel.any() else None,
                 "mean_lcs": float(np.mean(lcs_N[sel])) if sel.any() else None})
  return rows
