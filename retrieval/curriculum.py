"""The copy curriculum of RETRO training: for the first `train.copy_curriculum` share of
`train.steps`, neighbour 0 of every training chunk is the sequence's own text, a noisy later copy.

Chunk c's neighbour 0 becomes the L+1 tokens of its sequence (inputs, then the last
target) from c*m + shift on (R tokens, 0 past the sequence end), with `shift` drawn per
chunk from 0..`copy_max_shift` and a `copy_noise` share of its tokens replaced at random,
as another edition of the text would read: misaligned and respelled. The cross-attention
can lower the loss only by copying what followed the current token, so it learns that
(with `model.cca_smear_keys`) within a few hundred steps (bench/copy_probe.py); the real
neighbours then take over. Training batches only: evaluation never sees its own text.

`train.copy_distractors` (every step, not only in the curriculum): that share of training
chunks reads the neighbours of another chunk of its sequence, at least two chunks away:
text of the same work that does not continue the query, as an unrelated datastore
returns (sequences of 4 or more chunks). Without them the neighbours of training text are always right (own text, then
its other edition), and the model learns to trust any neighbour: it must learn to check
the match.
"""

from __future__ import annotations

import ml_collections
import numpy as np


def copy_neighbours(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                    step: int) -> dict[str, np.ndarray]:
  """`batch` with neighbour 0 of each chunk replaced while `step` is in the curriculum.

  Draws depend on (seed, step, sequence index) only, so a row is the same whichever
  process reads it. Padding rows (index -1) are left alone.
  """
  t = config.train
  copying = step < t.copy_curriculum * t.steps
  if not (copying or t.copy_distractors) or "neighbours" not in batch:
    return batch
  nbr_BxCxKxR = batch["neighbours"].copy()
  B, C, _, R = nbr_BxCxKxR.shape
  m, V = config.model.chunk_size, config.model.vocab_size
  text_BxT = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  text_BxT = np.pad(text_BxT, ((0, 0), (0, C * m + t.copy_max_shift + R)))
  for b, index in enumerate(batch["index"]):
    if index < 0:
      continue
    rng = np.random.default_rng((config.seed, step, int(index)))
    if copying:
      start_C = np.arange(C) * m + rng.integers(0, t.copy_max_shift + 1, C)
      window_CxR = text_BxT[b, start_C[:, None] + np.arange(R)]
      noisy_CxR = (rng.random((C, R)) < t.copy_noise) & (window_CxR != 0)
      nbr_BxCxKxR[b, :, 0] = np.where(noisy_CxR, rng.integers(1, V, (C, R)), window_CxR)
    if t.copy_distractors and C >= 4:  # with fewer chunks some have none 2 or more away
      swap_C = rng.random(C) < t.copy_distractors
      # another chunk at least 2 away: c + 2 .. c + C - 2 (mod C)
      other_C = (np.arange(C) + 2 + rng.integers(0, C - 3, C)) % C
      nbr_BxCxKxR[b] = np.where(swap_C[:, None, None], nbr_BxCxKxR[b, other_C], nbr_BxCxKxR[b])
  return {**batch, "neighbours": nbr_BxCxKxR}
