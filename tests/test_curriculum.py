"""RETRO's copy curriculum (retrieval/curriculum.py): what replaces neighbour 0, when, and
that a row's draws do not depend on the batch (or process) it is read in."""

from __future__ import annotations

import numpy as np

import configs
from retrieval.curriculum import copy_neighbours


def _batch(index_B: list[int], C: int = 3, K: int = 2, m: int = 64, R: int = 128,
           V: int = 512) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(7)
  text_BxT = np.stack([np.random.default_rng(i + 100).integers(1, V, C * m + 1)
                       for i in index_B])
  return {"inputs": text_BxT[:, :-1], "targets": text_BxT[:, 1:],
          "neighbours": rng.integers(1, V, (len(index_B), C, K, R)),
          "index": np.asarray(index_B)}


def _config(steps: int, noise: float) -> configs.ml_collections.ConfigDict:
  """The curriculum over the first `steps` of 10."""
  return configs.load("tiny_retro", ["train.steps=10", f"train.copy_curriculum={steps / 10}",
                                     f"train.copy_noise={noise}", "train.copy_max_shift=8"])


def test_neighbour_zero_is_the_shifted_own_text_then_the_real_one():
  cfg, batch = _config(5, 0.0), _batch([3, 9, -1])
  m, R = cfg.model.chunk_size, 128
  out = copy_neighbours(batch, cfg, step=4)
  text = np.concatenate([batch["inputs"][:, :1], batch["targets"]], 1)
  for b in range(2):
    for c in range(3):
      got = out["neighbours"][b, c, 0]
      shifts = [s for s in range(9)
                if np.array_equal(got, np.pad(text[b, c * m + s:], (0, 2 * R))[:R])]
      assert len(shifts) == 1, (b, c)  # a copy from chunk c on, 0..8 tokens late, 0 past the end
  np.testing.assert_array_equal(out["neighbours"][:, :, 1], batch["neighbours"][:, :, 1])
  np.testing.assert_array_equal(out["neighbours"][2], batch["neighbours"][2])  # padding row
  assert copy_neighbours(batch, cfg, step=5) is batch  # the curriculum is over


def test_noise_replaces_about_its_share_and_draws_follow_the_row_not_the_batch():
  cfg = _config(5, 0.2)
  alone = copy_neighbours(_batch([9]), cfg, step=2)["neighbours"][0, :, 0]
  mixed = copy_neighbours(_batch([3, 9]), cfg, step=2)["neighbours"][1, :, 0]
  np.testing.assert_array_equal(alone, mixed)
  clean = copy_neighbours(_batch([9]), _config(5, 0.0), step=2)["neighbours"][0, :, 0]
  changed = np.mean(alone != clean)
  assert 0.12 < changed < 0.28, changed
  other_step = copy_neighbours(_batch([9]), cfg, step=3)["neighbours"][0, :, 0]
  assert not np.array_equal(alone, other_step)


def test_distractors_give_a_share_of_chunks_the_neighbours_of_a_chunk_two_or_more_away():
  cfg = configs.load("tiny_retro", ["train.copy_distractors=0.5"])  # no curriculum
  batch = _batch(list(range(40)), C=8)
  out = copy_neighbours(batch, cfg, step=1000)["neighbours"]
  moved = 0
  for b in range(40):
    for c in range(8):
      src = [c2 for c2 in range(8) if np.array_equal(out[b, c], batch["neighbours"][b, c2])]
      assert len(src) == 1 and (src[0] == c or min(abs(src[0] - c), 8 - abs(src[0] - c)) >= 2)
      moved += src[0] != c
  assert 0.35 < moved / 320 < 0.65, moved
  assert copy_neighbours(batch, configs.load("tiny_retro"), step=0) is batch  # both off
  short = _batch([1, 2], C=3)  # no chunk of 3 has every other chunk 2 away: left as is
  np.testing.assert_array_equal(copy_neighbours(short, cfg, step=0)["neighbours"],
                                short["neighbours"])
