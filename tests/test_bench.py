"""The benchmark scripts run and print one JSON line (tiny settings; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, keys", [
    (["bench/train_throughput.py", "--config", "tiny_retro", "--steps", "1"],
     {"train_tokens_per_s", "forward_tokens_per_s", "train_flops_xla", "model_flops_per_token",
      "peak_flops_per_s_per_device", "mfu", "forward_mfu"}),
    (["bench/knnlm.py", "--config", "tiny_knnlm", "--entries", "3000", "--batches", "1"],
     {"lm_tokens_per_s", "knnlm_approximate_tokens_per_s", "knnlm_exact_tokens_per_s",
      "knnlm_approximate_vs_lm"}),
    (["bench/retrieval.py", "--skip-embedder", "--sizes", "2000", "--queries", "50",
      "--repeats", "1", "--out", "{tmp}"], {"index", "auto", "png"}),
], ids=["train_throughput", "knnlm", "retrieval"])
def test_bench_prints_one_json_line(argv, keys, tmp_path):
  argv = [a.format(tmp=tmp_path) for a in argv]
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout[-2000:]
  result = json.loads(lines[0])
  assert keys <= set(result), sorted(result)
  if "mfu" in keys:  # on CPU against its measured float32 matmul peak
    assert 0 < result["mfu"] < 1 and result["peak_source"].startswith("measured"), result


def test_train_vs_torch_needs_a_retro_pytorch_checkout(tmp_path):
  """The PyTorch comparison runs only where torch and a RETRO-pytorch checkout are (never in
  CI); without them it stops with one line."""
  proc = subprocess.run([sys.executable, "bench/train_vs_torch.py", "--torch-python",
                         sys.executable, "--retro-pytorch", str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "is not a RETRO-pytorch checkout" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
