"""In-Context RALM trained with retrieval in its context: the baseline decoder reading the
top datastore chunk (+ continuation) retrieved every 64 tokens by the last 64 tokens.

Each step runs the decoder once per 64-token block on [document ; text so far] (about 6x
the baseline's tokens at seq_len 512), so it trains several times slower than the baseline.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "incontext_small"
  c.model.name = "incontext"
  c.model.num_neighbours = 1
  return c
