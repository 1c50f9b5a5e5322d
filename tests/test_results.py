"""The shortened results run reproduces its recorded numbers (slow: about 25 minutes on 2 cores,
deselected by default; run with `python -m pytest -m slow tests/test_results.py`).

`results/quick_reference.json` holds the validation perplexities of `python scripts/results.py
--quick` (40 training steps, REALM 8, 4 evaluation batches, seed 0) as measured on a 2-core
x86-64 CPU. Everything is seeded and XLA's CPU programs are deterministic, so a re-run on the
same software matches to float rounding; TOLERANCE (2% relative) leaves room for other
CPUs and library versions, while still catching a changed model, data pipeline or recipe
(40 steps move the perplexity by far more than 2%). The neighbour coverage shares depend on
no training, only on the retrieved neighbours: they must agree within COVERAGE_TOLERANCE
(absolute; an approximate FAISS index may break ties differently elsewhere).
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
COVERAGE_TOLERANCE = 0.005


def perplexities(rows: dict) -> dict[str, float]:
  """Every validation perplexity in a results.json, flat (kNN-LM: its best λ per T)."""
  out = {}
  for key, row in rows.items():
    if key in ("seconds", "coverage"):
      continue
    out[key] = row["perplexity"]
    if "knn" in row:
      out[f"{key}/best"] = row["knn"]["best_perplexity"]
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
  assert rows["coverage"].keys() == reference["coverage"].keys()
  for label, shares in reference["coverage"].items():
    for key, value in shares.items():
      assert rows["coverage"][label][key] == pytest.approx(value, abs=COVERAGE_TOLERANCE), key
  assert (tmp_path / "RESULTS.md").read_text().startswith("# Results")
  assert (tmp_path / "perplexity.png").stat().st_size > 0
