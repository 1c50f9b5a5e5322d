"""PyTorch reference for the chunk embedder benchmark: `BertModel` + mean pooling.

Run by `bench/retrieval.py --torch-python PYTHON` as a worker process in a separate
environment that has torch and transformers (PyTorch is no dependency of this project):

    PYTHON bench/torch_bert.py MODEL_FOLDER TEXTS_JSON BATCH_SIZE MAX_TOKENS THREADS

It loads the model, then answers each line on stdin: `run` embeds all the texts once and
prints `{"seconds": ...}`; `save PATH` writes the embeddings of the last run (float32 .npy);
`quit` exits. Like sentence-transformers' `encode`, texts are sorted by length and each
batch is padded to its own longest text; the pooled vectors are L2-normalised when the
model folder's `modules.json` lists a Normalize module (all-MiniLM-L6-v2 does).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel


def main() -> None:
  folder, texts_json, batch_size, max_tokens, threads = sys.argv[1:6]
  batch_size, max_tokens, threads = int(batch_size), int(max_tokens), int(threads)
  torch.set_num_threads(threads)
  texts = json.loads(Path(texts_json).read_text())
  tokenizer = AutoTokenizer.from_pretrained(folder)
  model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
  modules = Path(folder) / "modules.json"
  normalize = modules.exists() and "Normalize" in modules.read_text()
  last = None

  def run() -> np.ndarray:
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    order = np.argsort([-n for n in lengths], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
      for s in range(0, len(texts), batch_size):
        rows = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                        max_length=max_tokens, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if normalize:
          pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out[rows] = pooled.numpy()
    return out

  print(json.dumps({"ready": True, "torch": torch.__version__, "threads": threads}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    if cmd[0] == "run":
      start = time.perf_counter()
      last = run()
      print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    elif cmd[0] == "save":
      np.save(cmd[1], last)
      print(json.dumps({"saved": cmd[1]}), flush=True)


if __name__ == "__main__":
  main()
