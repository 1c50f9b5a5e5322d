"""The RETRO paper's 425M model (Table 2) for GPUs and TPUs: bf16, seq 2048, remat."""

from configs import base


def get_config():
  c = base.paper(base.base_config(), "425m")
  c.name = "retro_425m"
  c.model.name = "retro"
  return c
