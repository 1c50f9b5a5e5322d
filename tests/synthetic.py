"""A synthetic corpus for end-to-end tests: small, seeded, with something to retrieve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.family import RetrievalSpec

# The retrieval requests of the tiny RETRO and REALM configs (chunk size 64), written out so the
# builders can be tested with an explicit request.
RETRO_REQUEST = RetrievalSpec(kind="neighbours", k=2, length=128, batch_keys=("neighbours",),
                              stride=64, query_len=64)
REALM_REQUEST = RetrievalSpec(kind="candidates", k=4, length=64, query_len=64,
                              batch_keys=("candidates", "candidate_embeddings", "query_embedding"))


def write_corpus(directory: Path, num_docs: int = 10, words_per_doc: int = 1500,
                 num_words: int = 400, num_phrases: int = 20) -> str:
  """Zipf-distributed pseudo-words with phrases shared across documents; returns the glob."""
  rng = np.random.default_rng(0)
  syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "el", "dan", "qui", "po", "ras"]
  words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4)))
                  for _ in range(num_words)})
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  phrases = [" ".join(rng.choice(words, size=12, p=p)) for _ in range(num_phrases)]
  directory.mkdir(parents=True, exist_ok=True)
  for d in range(num_docs):
    parts = []
    while sum(len(x.split()) for x in parts) < words_per_doc:
      if rng.random() < 0.3:
        parts.append(phrases[rng.integers(len(phrases))] + ".")
      else:
        parts.append(" ".join(rng.choice(words, size=10, p=p)) + ".")
    (directory / f"doc{d:02d}.txt").write_text(" ".join(parts) + "\n")
  return str(directory / "*.txt")


def corpus_overrides(root: Path, **corpus_kwargs) -> list[str]:
  """Config overrides that train on a corpus written under `root`, with its own cache."""
  glob = write_corpus(root / "corpus", **corpus_kwargs)
  return [f"data.corpus={glob}", f"data.cache_dir={root / 'cache'}", "data.max_documents=0",
          "data.val_fraction=0.2"]
