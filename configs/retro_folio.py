"""RETRO trained to copy: its datastore is the First Folio edition of the training plays.

Every training chunk of a play that is in the Folio finds the same passage in the Folio's
spelling (a near-duplicate of its continuation), as web-scale RETRO training finds copies of
its text. The Folio editions of the held-out plays are dropped, so evaluation with this
datastore has no overlap with the validation text; `python eval.py --workdir ...
--heldout keep` lets them back in (the leakage case of the RETRO paper's overlap analysis).
"""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "retro_folio"
  c.model.name = "retro"
  c.retrieval.datastore = "shakespeare_folio"
  c.retrieval.datastore_drop_heldout = True
  return c
