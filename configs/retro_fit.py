"""RETRO-fitting (RETRO paper, section 4.3): `retro_small` whose decoder starts from a
trained `baseline_small` (runs/baseline_small, from `python train.py --config
baseline_small`) and stays frozen; only the neighbour encoder and the chunked
cross-attention train, so the loss can fall only through the neighbours, and with
retrieval off the model is exactly its baseline.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "retro_fit"
  c.model.name = "retro"
  c.train.init_from = "runs/baseline_small"
  c.train.trainable = ("encoder", "cross_")
  return c
