"""PyTorch reference for the training benchmark: lucidrains/RETRO-pytorch at bench_small shapes.

Run by `bench/train_vs_torch.py` as a worker in an environment that has torch and einops
(neither is a dependency of this project), on a checkout of RETRO-pytorch outside the
repository (never vendored):

    PYTHON bench/torch_retro.py RETRO_PYTORCH_DIR STEPS THREADS

Prints ONE JSON line: the median seconds of STEPS timed training steps (forward, backward,
AdamW; after 2 warm-up steps) and the decoder tokens per second (B*L per step, as
bench/train_throughput.py counts them). Shapes are configs/bench_small.py's: vocab 8192,
batch 8 x 512, decoder 256 wide x 6 (attention inner width 256, feed-forward 1024),
encoder 128 wide x 2, chunked cross-attention at layers 3 and 6, 2 neighbours of 128
tokens per 64-token chunk, dropout 0, fp32. The checkout's RETRO fixes 8 heads, so the
head width is 32 (8 x 32 = 256, ours 4 x 64: the same FLOPs); its encoder's attention is
256 wide (ours 128) and cross-attends to the decoder (ours does not).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

VOCAB, BATCH, SEQ, CHUNK, NEIGHBOURS, NEIGHBOUR_LEN = 8192, 8, 512, 64, 2, 128


def load_retro(checkout: Path) -> type:
  """The RETRO class from `retro_pytorch/retro_pytorch.py` of the checkout, without the
  package's __init__ (which imports its data and retrieval tools: faiss, sentencepiece)."""
  package = types.ModuleType("retro_pytorch")
  package.__path__ = [str(checkout / "retro_pytorch")]
  retrieval = types.ModuleType("retro_pytorch.retrieval")
  retrieval.BERT_VOCAB_SIZE = 28996  # the only name retro_pytorch.py imports from it
  sys.modules.update({"retro_pytorch": package, "retro_pytorch.retrieval": retrieval})
  spec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch",
                                                checkout / "retro_pytorch" / "retro_pytorch.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.RETRO


def main() -> None:
  checkout, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = load_retro(checkout)(
      num_tokens=VOCAB, max_seq_len=SEQ, enc_dim=128, enc_depth=2, dec_dim=256, dec_depth=6,
      dec_cross_attn_layers=(3, 6), dim_head=32, chunk_size=CHUNK).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  seq = torch.randint(1, VOCAB, (BATCH, SEQ + 1))
  retrieved = torch.randint(1, VOCAB, (BATCH, SEQ // CHUNK, NEIGHBOURS, NEIGHBOUR_LEN))

  def step() -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    optimizer.step()
    float(loss.detach())
    return time.perf_counter() - start

  for _ in range(2):
    step()
  times = [step() for _ in range(steps)]
  median = statistics.median(times)
  print(json.dumps({
      "bench": "torch_retro", "torch": torch.__version__, "threads": threads,
      "params": sum(p.numel() for p in model.parameters()), "train_step_s": median,
      "train_tokens_per_s": BATCH * SEQ / median, "step_s": times}))


if __name__ == "__main__":
  main()
