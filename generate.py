"""Sample text from a checkpoint, with retrieval and citations: `python generate.py --workdir DIR
--prompt "To be, or not to be" [--max-tokens 128] [--temperature 0.8] [--top-k 40] [--top-p 0.95]`.

    from generate import generate, format_generation
    for g in generate("runs/retro_small", ["To be, or not to be"], max_tokens=128, seed=0):
      print(format_generation(g))       # the text, then the datastore chunks that shaped it

The thin command line over `inference` (see `inference.generation`). How each family
retrieves while sampling is its decoding loop's docstring (`models/<family>.py: sample`):
RETRO re-retrieves after every completed 64-token chunk, kNN-LM queries its datastore at
every step, the REALM reader samples from the exact marginal over the prompt's top-k chunks
and the null document, In-Context RALM re-retrieves every `stride` tokens and reads the
documents in its context.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from common import cli
from common.errors import cli_main
from inference import Generation, format_attribution, format_generation, generate

__all__ = ["generate", "format_generation", "Generation", "main"]


@cli_main
def main(argv: Sequence[str] | None = None) -> list[Generation]:
  p = cli.parser("Sample text from a checkpoint, with retrieval and citations.",
                 config_required=False)
  p.add_argument("--workdir", required=True,
                 help="run directory written by train.py, or a run bundle (python -m "
                      "training.export): a folder, gs://..., hf://org/name")
  p.add_argument("--prompt", action="append", required=True,
                 help="text to continue (repeat for a batch)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k best tokens (0 = all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--no-retrieval", action="store_true",
                 help="sample without the datastore (RETRO, In-Context RALM)")
  p.add_argument("--knn", action="store_true", help="sample a transformer as a kNN-LM")
  p.add_argument("--lam", type=float, default=None, help="kNN-LM interpolation weight")
  p.add_argument("--k", type=int, default=None, help="kNN-LM neighbours per step")
  p.add_argument("--knn-temperature", type=float, default=None,
                 help="kNN-LM softmax temperature over distances")
  p.add_argument("--neighbours", type=int, default=None,
                 help="datastore items retrieved per query (REALM candidates, RETRO and "
                      "In-Context RALM documents; default as trained)")
  p.add_argument("--datastore", default=None,
                 help="retrieve from this datastore (corpus spec or edited version) instead")
  p.add_argument("--without", action="append", default=[],
                 help="remove these datastore documents first (id, glob or @FILE; repeatable)")
  p.add_argument("--keep-eos", action="store_true", help="continue past the end of a document")
  p.add_argument("--json", default=None, help="also write the generations to this JSON file")
  args, _ = cli.parse(p, argv)
  knn = None
  if args.knn or any(v is not None for v in (args.lam, args.k, args.knn_temperature)):
    knn = {"lam": args.lam, "k": args.k, "temperature": args.knn_temperature}
  generations = generate(args.workdir, args.prompt, args.max_tokens, args.temperature,
                         args.top_k, args.top_p, args.seed, step=args.step,
                         retrieval=not args.no_retrieval, knn=knn, k=args.neighbours,
                         stop_at_eos=not args.keep_eos, datastore=args.datastore,
                         without=args.without)
  for g in generations:
    print(format_generation(g), end="\n\n")
    print(format_attribution(g), end="\n\n")
  if args.json:
    Path(args.json).write_text(json.dumps([g.to_json() for g in generations], indent=2))
    print(f"wrote {args.json}")
  return generations


if __name__ == "__main__":
  main(sys.argv[1:])
