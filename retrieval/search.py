"""Nearest datastore chunks to a piece of text.

    python -m retrieval.search --config retro_small "To be, or not to be" [--k 5]

Embeds the text with the config's embedder and searches the datastore index (both built
and cached on first use, as by `python -m retrieval.build`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import ml_collections
import numpy as np

from common import cli
from common.errors import UserError, cli_main
from data import dataset
from retrieval import datastore
from retrieval import index as index_lib


@dataclasses.dataclass(frozen=True)
class Hit:
  chunk: int  # datastore chunk id
  doc_id: str
  distance: float  # inner product (metric "ip": higher is nearer) or squared L2
  text: str


def search_text(config: ml_collections.ConfigDict, text: str, k: int,
                prepared: dataset.Prepared | None = None) -> list[Hit]:
  """The k datastore chunks nearest to `text`, best first."""
  if k < 1:
    raise UserError(f"--k={k} must be >= 1")
  if not text.strip():
    raise UserError("the query text is empty; pass some text to search for")
  prepared = dataset.prepare(config) if prepared is None else prepared
  store = datastore.load_datastore(config, prepared)
  embedder = datastore.load_embedder(config)
  index = datastore.store_vectors(config, prepared, store, embedder)[2]
  dists_1xK, ids_1xK = index_lib.search(index, embedder.embed_texts([text]), k)
  chunks_Nxm = store.split.chunk_tokens()
  chunk_doc_N = store.split.chunk_doc()
  hits = []
  for dist, chunk in zip(dists_1xK[0], ids_1xK[0]):
    if chunk < 0:
      continue
    hits.append(Hit(chunk=int(chunk), doc_id=store.split.doc_ids[chunk_doc_N[chunk]],
                    distance=float(dist),
                    text=prepared.tokenizer.decode(np.asarray(chunks_Nxm[chunk]).tolist())))
  return hits


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
  p = cli.parser("Print the datastore chunks nearest to some text.")
  p.add_argument("text", nargs="+", help="the query text")
  p.add_argument("--k", type=int, default=5, help="how many chunks to print")
  args, config = cli.parse(p, argv)
  hits = search_text(config, " ".join(args.text), args.k)
  metric = "inner product" if config.retrieval.metric == "ip" else "squared L2"
  for rank, hit in enumerate(hits, 1):
    snippet = " ".join(hit.text.split())
    print(f"{rank}. {hit.doc_id}  chunk {hit.chunk}  {metric} {hit.distance:.4f}\n   {snippet}")


if __name__ == "__main__":
  main(sys.argv[1:])
