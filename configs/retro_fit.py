"""RETRO-fitting (RETRO paper, section 4.3): `retro_small` whose decoder starts from a
trained `baseline_small` (runs/baseline_small, from `python train.py --config
baseline_small`) and stays frozen; only the neighbour encoder and the chunked
cross-attention train, so the loss can fall only through the neighbours, and with
retrieval off the model is exactly its baseline.

The recipe that teaches the neighbour path to copy (results/copy/README.md): smeared CCA
keys, a copy curriculum for the first half of training (neighbour 0 = the sequence's own
text, shifted and 10% respelled: retrieval/curriculum.py), and distractors throughout (a
quarter of the chunks read another chunk's neighbours, so the model checks before it copies).
"""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "retro_fit"
  c.model.name = "retro"
  c.model.cca_smear_keys = True
  c.train.init_from = "runs/baseline_small"
  c.train.trainable = ("encoder", "cross_")
  c.train.copy_curriculum = 0.5
  c.train.copy_distractors = 0.25
  return c
