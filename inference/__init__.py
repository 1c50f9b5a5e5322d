"""Generation: sampling from a checkpoint with retrieval and citations (`generate.py` is its CLI).

    from inference import generate, format_generation

`inference.generation` (the `generate` entry point and the `Context` a family's decoding
loop receives), `inference.sampling` (sampler, lockstep batch, decoding step, result
types), `inference.stores` (chunk and kNN-LM datastores for retrieval while sampling).
The decoding loops themselves are the families' (`models/<family>.py: sample`).
"""

from inference.generation import (Context, attribution, format_attribution, format_generation,
                                  generate)
from inference.sampling import ChunkCitation, Generation, Neighbour, Sampler

__all__ = ["Context", "ChunkCitation", "Generation", "Neighbour", "Sampler", "generate",
           "format_generation", "attribution", "format_attribution"]
