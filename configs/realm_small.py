"""REALM reader over top-k retrieved chunks with a null document, same decoder size (warm-start
its reader from a baseline: --config.train.init_from=runs/baseline_small)."""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "realm_small"
  c.model.name = "realm"
  c.model.num_neighbours = 4
  c.model.realm.doc_encoder = "trainable"  # the refresh re-embeds with this encoder
  c.retrieval.refresh_every = 100
  return c
