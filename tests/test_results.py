"""The shortened results run reproduces its recorded numbers (slow: about 30 minutes on 2 cores,
deselected by default; run with `python -m pytest -m slow tests/test_results.py`).

`results/quick_reference.json` holds every perplexity of `python scripts/results.py --quick`
(the protocol of scripts/results.py with its QUICK recipe: a few steps, one seed, 4
evaluation batches) as measured on a 2-core x86-64 CPU. Everything is seeded and XLA's CPU
programs are deterministic, so a re-run on the same software matches to float rounding;
TOLERANCE (2% relative) leaves room for other CPUs and library versions, while still
catching a changed model, data pipeline or recipe. The leakage check of the reported
datastores depends on no training and must match exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "quick_reference.json"
TOLERANCE = 0.02


def perplexities(rows: dict) -> dict[str, float]:
  """Every perplexity of a results.json, flat: the sweep's and each evaluation's."""
  out = {f"sweep/{lr}": p for lr, p in rows["sweep"]["perplexity"].items()}
  out.update({key: row["perplexity"] for key, row in rows["evals"].items()})
  return out


@pytest.mark.slow
def test_quick_results_reproduce(tmp_path):
  reference = json.loads(REFERENCE.read_text())
  want = reference["perplexity"]
  proc = subprocess.run([sys.executable, "scripts/results.py", "--quick", "--out", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())
  got = perplexities(rows)
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=TOLERANCE), key
  assert rows["leakage"] == reference["leakage"]
  assert (tmp_path / "RESULTS.md").read_text().startswith("# Results")
  assert (tmp_path / "curves.png").stat().st_size > 0
