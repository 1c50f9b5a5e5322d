"""The benchmark RETRO: vocab 8192, decoder 256x6 (4 heads x 64), encoder 128x2, CCA at 3 and 6."""

from configs import base


def get_config():
  c = base.base_config()
  c.name = "bench_small"
  c.model.name = "retro"
  c.model.dropout = 0.0
  c.model.cca_layers = (3, 6)
  c.model.num_neighbours = 2
  c.data.seq_len = 512
  c.data.batch_size = 8
  return c
