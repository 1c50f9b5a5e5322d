"""Training throughput side by side with PyTorch's RETRO: one JSON line.

    python bench/train_vs_torch.py --torch-python PY --retro-pytorch DIR \
        [--rounds 3] [--steps 5] [--threads 2]

Alternates this project's `bench/train_throughput.py --config bench_small` and
`bench/torch_retro.py` (lucidrains/RETRO-pytorch at the same shapes; DIR is a checkout
outside this repository, expected at commit d086613; PY an interpreter with torch and
einops) `--rounds` times each, in separate processes, and prints both medians of decoder
tokens/s, their ratio, every run, the machine's fp32 matmul peak (our bench's fastest
jitted 2048^2 matmul, in the same process as its training) and our training GFLOP/s (XLA's
count) and model FLOP/s as fractions of that peak: the distance to the limit. Both use
`--threads` threads (XLA: the process's cores, limited with taskset when fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_main  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPECTED_COMMIT = "d086613"


def _run(args: list[str], cpus: str) -> dict:
  """Runs a bench process pinned to `cpus`; its last stdout line as JSON."""
  proc = subprocess.run(["taskset", "-c", cpus, *args], capture_output=True, text=True,
                        cwd=HERE.parent, timeout=1800)
  if proc.returncode != 0:
    raise UserError(f"{' '.join(args[:2])} failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _commit(checkout: Path) -> str | None:
  proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  return proc.stdout.strip() or None


@cli_main
def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch-python", required=True, help="a Python with torch and einops")
  p.add_argument("--retro-pytorch", required=True, help="a checkout of lucidrains/RETRO-pytorch")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5, help="timed steps per run")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  checkout = Path(args.retro_pytorch)
  if not (checkout / "retro_pytorch" / "retro_pytorch.py").is_file():
    raise UserError(f"{checkout} is not a RETRO-pytorch checkout (no retro_pytorch/"
                    f"retro_pytorch.py); clone github.com/lucidrains/RETRO-pytorch there")
  if not Path(args.torch_python).exists():
    raise UserError(f"--torch-python {args.torch_python} does not exist")
  cpus = f"0-{args.threads - 1}"
  ours_cmd = [sys.executable, str(HERE / "train_throughput.py"), "--config", "bench_small",
              "--steps", str(args.steps)]
  torch_cmd = [args.torch_python, str(HERE / "torch_retro.py"), str(checkout), str(args.steps),
               str(args.threads)]
  ours, theirs = [], []
  for _ in range(args.rounds):  # alternating, so a slow spell of the machine hits both
    ours.append(_run(ours_cmd, cpus))
    theirs.append(_run(torch_cmd, cpus))
  ours_tps = statistics.median(r["train_tokens_per_s"] for r in ours)
  torch_tps = statistics.median(r["train_tokens_per_s"] for r in theirs)
  peak = statistics.median(r["peak_flops_per_s_per_device"] or 0 for r in ours) or None
  gflops = statistics.median(r["train_gflops_per_s"] or 0 for r in ours)
  model_flops = ours[0]["model_flops_per_token"] * ours_tps
  commit = _commit(checkout)
  result = {
      "bench": "train_vs_torch", "config": "bench_small", "threads": args.threads,
      "cpu": platform.processor() or platform.machine(), "rounds": args.rounds,
      "ours_tokens_per_s": ours_tps, "torch_tokens_per_s": torch_tps,
      "ratio": ours_tps / torch_tps,
      "ours_runs": [r["train_tokens_per_s"] for r in ours],
      "torch_runs": [r["train_tokens_per_s"] for r in theirs],
      "torch_version": theirs[0]["torch"], "retro_pytorch_commit": commit,
      "retro_pytorch_expected": EXPECTED_COMMIT,
      "ours_params": ours[0]["params"], "torch_params": theirs[0]["params"],
      "peak_gflops_per_s": peak / 1e9 if peak else None,
      "ours_train_gflops_per_s_xla": gflops,
      "ours_fraction_of_peak_xla": gflops * 1e9 / peak if peak else None,
      "ours_model_gflops_per_s": model_flops / 1e9,
      "ours_fraction_of_peak_model": model_flops / peak if peak else None,
      "load_avg_1m": os.getloadavg()[0],
  }
  if commit and not commit.startswith(EXPECTED_COMMIT):
    result["warning"] = f"RETRO-pytorch at {commit[:7]}, not {EXPECTED_COMMIT}"
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
