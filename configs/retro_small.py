"""The default: a CPU-friendly RETRO on the embedded Shakespeare corpus."""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "retro_small"
  c.model.name = "retro"
  return c
