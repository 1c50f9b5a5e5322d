"""The retro_small decoder without retrieval: the baseline LM."""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "baseline_small"
  c.model.name = "transformer"
  return c
