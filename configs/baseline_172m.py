"""The decoder of retro_172m without retrieval: the paper's 132M baseline."""

from configs import base


def get_config():
  c = base.paper(base.base_config(), "172m")
  c.name = "baseline_172m"
  c.model.name = "transformer"
  return c
