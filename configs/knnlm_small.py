"""kNN-LM on the baseline_small decoder: train the base LM, then interpolate with a datastore."""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "knnlm_small"
  c.model.name = "knnlm"
  return c
