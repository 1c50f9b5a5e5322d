"""What RETRO neighbours could tell the decoder: token coverage of the continuation.

The neighbours of chunk c are read by the tokens that predict chunk c+1. Their use is
bounded by what they hold about chunk c+1 that the decoder cannot already see:

    cov = continuation_coverage(split.tokens, nbr_SxCxKxR, split.seq_len, split.chunk_size)
    cov["new"]   # fraction of chunk c+1's tokens found in the neighbours and not earlier in the sequence

`shuffled` pairs every chunk with another chunk's neighbours: the coverage of unrelated text
of the same datastore, the level retrieval has to beat.
"""

from __future__ import annotations

import numpy as np


def continuation_coverage(tokens_T: np.ndarray, neighbours_SxCxKxR: np.ndarray, seq_len: int,
                          chunk_size: int) -> dict[str, float]:
  """Mean over chunk pairs (c, c+1) of the sequences whose neighbours are given.

  Returns:
    in_neighbours: fraction of chunk c+1's tokens that occur in chunk c's neighbours.
    in_context: fraction that occur earlier in the sequence (chunks 0..c).
    new: fraction that occur in the neighbours but not earlier in the sequence.
  Padding (token 0) never counts as found.
  """
  S, C = neighbours_SxCxKxR.shape[:2]
  m = chunk_size
  if C < 2 or C * m > seq_len:
    raise ValueError(f"need >= 2 chunks of {m} within seq_len {seq_len}, got C={C}")
  found = {"in_neighbours": [], "in_context": [], "new": []}
  for s in range(S):
    seq = np.asarray(tokens_T[s * seq_len:s * seq_len + C * m])
    for c in range(C - 1):
      target = seq[(c + 1) * m:(c + 2) * m]
      live = target != 0
      if not live.any():
        continue
      nbr = np.asarray(neighbours_SxCxKxR[s, c]).ravel()
      in_nbr = np.isin(target, nbr[nbr != 0]) & live
      in_ctx = np.isin(target, seq[:(c + 1) * m]) & live
      n = live.sum()
      found["in_neighbours"].append(in_nbr.sum() / n)
      found["in_context"].append(in_ctx.sum() / n)
      found["new"].append((in_nbr & ~in_ctx).sum() / n)
  return {key: float(np.mean(v)) if v else float("nan") for key, v in found.items()}


def shuffled(neighbours_SxCxKxR: np.ndarray, seed: int = 0) -> np.ndarray:
  """The same neighbour lists, each given to a random chunk (a fixed permutation)."""
  S, C = neighbours_SxCxKxR.shape[:2]
  flat = np.asarray(neighbours_SxCxKxR).reshape(S * C, *neighbours_SxCxKxR.shape[2:])
  return flat[np.random.default_rng(seed).permutation(S * C)].reshape(
      neighbours_SxCxKxR.shape)
