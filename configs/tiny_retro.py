"""Tiny retro for tests: seconds per step on a CPU."""

from configs import base


def get_config():
  c = base.tiny(base.base_config())
  c.name = "tiny_retro"
  c.model.name = "retro"
  return c
