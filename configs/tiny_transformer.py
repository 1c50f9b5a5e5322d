"""Tiny transformer for tests: seconds per step on a CPU."""

from configs import base


def get_config():
  c = base.tiny(base.base_config())
  c.name = "tiny_transformer"
  c.model.name = "transformer"
  return c
