"""Tiny In-Context RALM for tests: seconds per step on a CPU."""

from configs import base


def get_config():
  c = base.tiny(base.base_config())
  c.name = "tiny_incontext"
  c.model.name = "incontext"
  c.model.num_neighbours = 2
  return c
