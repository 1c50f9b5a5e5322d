"""A tiny trained run exported as a bundle: it round-trips from an offline Hub cache
(same parameters and perplexity through eval.py, generate.py with citations, nothing
rebuilt) and from gs:// (a local stand-in); the Colab notebook runs end to end on CPU
against it; `generate.py` samples from the run's workdir; `bench/gpu_check.sh` runs on
CPU (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import nbformat
import numpy as np
import pytest
from etils import epath
from nbclient import NotebookClient

import configs
import eval as eval_lib
import generate as gen
import synthetic
import train
from common import artifacts
from data import corpora
from training import bundle, export

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"
REPO = "retrozoo/tiny-retro"
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["ka lo mi " * 40, "dan"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """tiny_retro trained for 2 steps on a synthetic corpus (its own artifact cache)."""
  root = tmp_path_factory.mktemp("notebook")
  config = configs.load("tiny_retro", synthetic.corpus_overrides(
      root, num_docs=6, words_per_doc=600, num_words=300, num_phrases=10))
  train.train_and_evaluate(config, str(root / "run"))
  return root / "run"


class _FakeHub:
  """Stands in for `huggingface_hub.HfApi`: records what would be uploaded."""
  calls: list = []

  def create_repo(self, repo_id, private=False, exist_ok=False):
    self.calls.append(("create_repo", repo_id, private, exist_ok))

  def upload_folder(self, folder_path, repo_id, commit_message):
    self.calls.append(("upload_folder", folder_path, repo_id))
    return f"https://huggingface.co/{repo_id}/commit/{REVISION}"


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> Path:
  """The run exported with the CLI (the Hub upload faked)."""
  out = tmp_path_factory.mktemp("bundle") / "tiny_retro"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(huggingface_hub, "HfApi", _FakeHub)
    export.main(["--workdir", str(workdir), "--out", str(out), "--push-to", REPO])
  return out


@pytest.fixture(scope="module")
def hub_cache(exported, tmp_path_factory) -> Path:
  """A Hugging Face cache holding the bundle as a downloaded repo: refs/main naming a
  snapshot whose files are symlinks (to the exported files, standing in for blobs)."""
  cache = tmp_path_factory.mktemp("hf-cache")
  repo = cache / f"models--{REPO.replace('/', '--')}"
  for path in exported.rglob("*"):
    if path.is_file():
      link = repo / "snapshots" / REVISION / path.relative_to(exported)
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(path)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(REVISION)
  return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
  """The Hub is `hub_cache`, offline, here and in subprocesses; returns the snapshot."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
  return hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION


def _files(directory: Path) -> set[str]:
  return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_export_writes_a_self_contained_bundle_and_uploads_it(exported):
  manifest = artifacts.read_manifest(exported)
  kinds = {name.split("/")[1] for name in manifest["files"] if name.startswith("cache/")}
  assert kinds == {"datasets", "embeddings", "index", "retro_neighbours"}
  assert set(manifest["paths"]) == {"data.corpus", "data.tokenizer", "data.cache_dir",
                                    "retrieval.embedder"}
  parts = export.sizes(exported)
  assert {"checkpoints/2", "tokenizer", "embedder", "config.json", "metrics.jsonl"} <= set(parts)
  assert manifest["bytes"] == sum(parts.values()) - parts["manifest.json"]
  assert _FakeHub.calls == [("create_repo", REPO, False, True),
                            ("upload_folder", str(exported), REPO)]


def test_bundle_round_trips_from_the_hub_without_rebuilding(workdir, offline_hub, tmp_path,
                                                            monkeypatch):
  """Loaded by repo id with no corpus and an empty cache, building forbidden: the same
  parameters, and eval.py's perplexities equal the workdir's; generate.py retrieves and
  cites; the snapshot gains only eval.py's results file."""
  empty = tmp_path / "cache"
  monkeypatch.setenv("RETROZOO_CACHE", str(empty))
  monkeypatch.setattr(corpora, "iter_corpus", lambda *a, **k: pytest.fail("corpus read"))
  before = _files(offline_hub)
  trained = json.loads((workdir / "final_metrics.json").read_text())
  with artifacts.verification(full=False, build=False):
    config, params = train.load_checkpoint(REPO)
    rows = eval_lib.main(["--workdir", f"hf://{REPO}@main"])
    gens = gen.main(["--workdir", f"hf://{REPO}", "--prompt", PROMPTS[0], "--prompt",
                     PROMPTS[1], "--max-tokens", "40", "--temperature", "0.8", "--top-k", "50",
                     "--keep-eos"])  # what bench/gpu_check.sh runs to restore a bundle
  _, original = train.load_checkpoint(workdir)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, original))
  assert config.data.cache_dir == str(offline_hub / "cache")
  assert [r["perplexity"] for r in rows] == pytest.approx(
      [trained["eval/perplexity"], trained["eval/no_retrieval/perplexity"]], rel=1e-6)
  assert [len(g.token_ids) for g in gens] == [40, 40]
  assert any(c.neighbours for c in gens[0].citations)
  assert _files(offline_hub) - before == {"eval_validation.json"}
  assert not empty.exists()


def test_bundle_from_gs_is_copied_once_through_epath(exported, tmp_path, monkeypatch):
  """gs:// goes through etils.epath (here a local folder stands in for the bucket)."""
  monkeypatch.setenv("RETROZOO_CACHE", str(tmp_path))
  real = epath.Path
  monkeypatch.setattr(epath, "Path", lambda url: real(str(url).replace("gs://bucket", str(
      exported.parent))))
  local = bundle.local("gs://bucket/tiny_retro")
  assert local.parent == tmp_path / "bundles" and _files(local) == _files(exported)
  assert bundle.load_config(local).data.corpus.startswith(str(local / "cache" / "datasets"))
  assert bundle.local("gs://bucket/tiny_retro") == local


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def test_colab_notebook_runs_end_to_end(offline_hub, monkeypatch):
  """Executed as CI would (a python3 kernel in the repository root) against the bundle on
  the offline Hub; the install cell installs nothing where retrozoo is importable."""
  monkeypatch.setenv("RETROZOO_BUNDLE", REPO)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    errors = [o for o in cell.outputs if o["output_type"] == "error"]
    assert not errors, errors
  printed = "\n".join(_text(c) for c in code)
  assert "accelerator: cpu; retrozoo is importable, nothing to install" in printed
  assert f"{REPO}: config tiny_retro, model retro" in printed
  assert "retrieval on: perplexity" in printed and "retrieval off: perplexity" in printed
  assert "To be, or not to be, that is the question:" in printed
  assert "generated tokens" in printed and "datastore chunk" in printed  # citations as data
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1


def test_generate_cli_on_a_checkpoint(workdir, tmp_path, capsys):
  out_json = tmp_path / "generations.json"
  gens = gen.main(["--workdir", str(workdir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                   "--max-tokens", "40", "--temperature", "0.8", "--top-k", "50", "--keep-eos",
                   "--json", str(out_json)])
  out = capsys.readouterr().out
  assert [len(g.token_ids) for g in gens] == [40, 40]
  assert gens[0].text in out and "tokens 0-" in out
  cited = [n for c in gens[0].citations for n in c.neighbours]
  assert cited and all(f"{n.doc_id} @ token {n.position}" in out for n in cited)
  saved = json.loads(out_json.read_text())
  assert saved == [g.to_json() for g in gens]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(offline_hub):
  """bench/gpu_check.sh with a tiny config: the bf16 training bench, then the bundle
  restored and sampled (greedy) from the Hub id."""
  proc = subprocess.run(["bash", "bench/gpu_check.sh", "tiny_retro", REPO], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "STEPS": "1", "PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stderr[-3000:]
  bench = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
  assert bench["dtype"] == "bfloat16" and bench["train_tokens_per_s"] > 0
  assert "To be, or not to be, that is the question:" in proc.stdout
  assert "[retro: 80 tokens" in proc.stdout
