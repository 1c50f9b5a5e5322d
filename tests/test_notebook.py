"""The Colab notebook runs end to end on CPU against a tiny trained checkpoint, and
`generate.py` samples from that checkpoint on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import configs
import synthetic
import generate as gen
import train

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """tiny_retro trained for 2 steps on a synthetic corpus (its own artifact cache)."""
  root = tmp_path_factory.mktemp("notebook")
  config = configs.load("tiny_retro", synthetic.corpus_overrides(
      root, num_docs=6, words_per_doc=600, num_words=300, num_phrases=10))
  train.train_and_evaluate(config, str(root / "run"))
  return root / "run"


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def test_colab_notebook_runs_end_to_end(workdir, monkeypatch):
  """Executed as CI would (a python3 kernel in the repository root, RETROZOO_WORKDIR set);
  the install cell is skipped outside Colab."""
  monkeypatch.setenv("RETROZOO_WORKDIR", str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    errors = [o for o in cell.outputs if o["output_type"] == "error"]
    assert not errors, errors
  printed = "\n".join(_text(c) for c in code)
  assert f"{workdir}: config tiny_retro, model retro" in printed
  assert "with retrieval: perplexity" in printed and "without retrieval: perplexity" in printed
  assert "To be, or not to be, that is the question:" in printed
  assert "generated tokens" in printed and "datastore chunk" in printed  # citations as data
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1


def test_generate_cli_on_a_checkpoint(workdir, tmp_path, capsys):
  out_json = tmp_path / "generations.json"
  gens = gen.main(["--workdir", str(workdir), "--prompt", "ka lo mi " * 40, "--prompt", "dan",
                   "--max-tokens", "40", "--temperature", "0.8", "--top-k", "50", "--keep-eos",
                   "--json", str(out_json)])
  out = capsys.readouterr().out
  assert [len(g.token_ids) for g in gens] == [40, 40]
  assert gens[0].text in out and "tokens 0-" in out
  cited = [n for c in gens[0].citations for n in c.neighbours]
  assert cited and all(f"{n.doc_id} @ token {n.position}" in out for n in cited)
  saved = json.loads(out_json.read_text())
  assert saved == [g.to_json() for g in gens]
