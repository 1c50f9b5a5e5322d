"""Tiny realm for tests: seconds per step on a CPU."""

from configs import base


def get_config():
  c = base.tiny(base.base_config())
  c.name = "tiny_realm"
  c.model.name = "realm"
  c.model.num_neighbours = 4
  return c
