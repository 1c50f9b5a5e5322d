"""The decoder of retro_425m without retrieval: the paper's 368M baseline."""

from configs import base


def get_config():
  c = base.paper(base.base_config(), "425m")
  c.name = "baseline_425m"
  c.model.name = "transformer"
  return c
