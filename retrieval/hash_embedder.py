"""A cheap deterministic embedder for scale benchmarks: `retrieval.embedder=hashing:<dim>`.

    emb = HashEmbedder(64)
    vecs_NxE = emb.embed_texts(["To be, or not to be"])    # float32 [1, 64], unit length

Each text is the signed bag of its UTF-8 byte trigrams hashed into `dim` buckets (the
"hashing trick"), L2-normalised: texts sharing many trigrams are near under the inner
product. It costs about 1/100 of MiniLM per chunk, so a benchmark can drive the pipeline
with millions of chunks on a few cores; its neighbours are lexical, not semantic. It
reuses `Embedder`'s chunk path (detokenise, embed, resumable sharded file), so it runs the
same stages as the real embedder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from common import artifacts
from common.errors import UserError
from retrieval import embedder as embedder_lib

PREFIX = "hashing:"
_MULTIPLIER = np.uint32(2654435761)  # Knuth's multiplicative hash


class HashEmbedder(embedder_lib.Embedder):
  """Hashed byte-trigram embeddings of width `dim` (see the module docstring)."""

  def __init__(self, dim: int):  # pylint: disable=super-init-not-called  (no BERT to load)
    if dim < 2:
      raise UserError(f"retrieval.embedder=hashing:{dim}: the width must be >= 2")
    self.dim = dim
    self.folder = f"{PREFIX}{dim}"
    self.pooling, self.normalize, self.max_tokens = ("hashed-trigrams",), True, 0
    self.hash = artifacts.fingerprint({"embedder": "hashed-byte-trigrams-v1", "dim": dim})

  @classmethod
  def from_spec(cls, spec: str) -> HashEmbedder:
    """`hashing:<dim>` -> HashEmbedder(dim)."""
    width = spec.removeprefix(PREFIX)
    if not width.isdigit():
      raise UserError(f"retrieval.embedder={spec!r}: write hashing:<width>, e.g. hashing:64")
    return cls(int(width))

  def embed_texts(self, texts: Sequence[str], progress: tqdm | None = None) -> np.ndarray:
    """float32 [N, dim]: each text's signed trigram counts, unit length (0 if too short)."""
    data = [t.encode() for t in texts]
    lengths = np.array([len(b) for b in data], np.int64)
    buf = np.frombuffer(b"".join(data), np.uint8).astype(np.uint32)
    out_NxE = np.zeros((len(texts), self.dim), np.float32)
    if len(buf) >= 3:
      h = ((buf[:-2] << np.uint32(16)) ^ (buf[1:-1] << np.uint32(8)) ^ buf[2:]) * _MULTIPLIER
      row = np.repeat(np.arange(len(texts)), lengths)[:-2]
      ends = np.cumsum(lengths)
      inside = np.ones(len(h), bool)  # trigrams that do not straddle two texts
      for k in (1, 2):
        straddle = ends - k
        inside[straddle[(straddle >= 0) & (straddle < len(h))]] = False
      bucket = (h >> np.uint32(12)) % np.uint32(self.dim)  # a multiplicative hash's
      sign = np.where(h >> np.uint32(31), 1.0, -1.0)         # good bits are its high ones
      out_NxE = np.bincount(row[inside] * self.dim + bucket[inside], sign[inside],
                            minlength=len(texts) * self.dim).astype(np.float32).reshape(
                                len(texts), self.dim)
      norms = np.linalg.norm(out_NxE, axis=1, keepdims=True)
      out_NxE /= np.where(norms > 0, norms, 1.0)
    if progress is not None:
      progress.update(len(texts))
    return out_NxE
