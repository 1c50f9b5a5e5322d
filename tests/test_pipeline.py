"""The artifact builds as Beam pipelines (retrieval/pipeline.py): the same bytes from 1 and 2
workers, resumption after a worker is killed, and memory that does not grow with the corpus."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import configs
from common import artifacts
from common.errors import UserError
from data import corpora, tokenizer
from retrieval import build, index, neighbours, ondisk, pipeline, shards
from tests import synthetic
from tests.test_embedder import write_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def retro(tmp_path_factory) -> list[str]:
  """tiny_retro overrides (Flat index, a tiny random BERT) with a private cache."""
  root = tmp_path_factory.mktemp("pipeline")
  bert = write_tiny_bert(root / "bert")
  return [*synthetic.corpus_overrides(root), f"retrieval.embedder={bert}",
          "retrieval.embed_max_tokens=64", "retrieval.index=Flat"]


def _files(cache: Path) -> dict[str, str]:
  """relative path -> sha256 of every .npy and .json artifact file under `cache`. Left out:
  manifests (they record timings and library versions), job.json (the shard size) and the
  TFDS copy of the documents, whose array_record files differ between any two builds."""
  return {p.relative_to(cache).as_posix(): artifacts.file_sha256(p)
          for p in sorted(cache.rglob("*")) if p.suffix in (".npy", ".json")
          and p.name not in ("manifest.json", "job.json", "tfds.files.json")
          and "tfds" not in p.relative_to(cache).parts}


def _two_worker_build(overrides: list[str], tmp_path: Path, keep: tuple[str, ...],
                      splits: tuple[str, ...] | None = None) -> None:
  """Builds the 1-worker reference into `tmp_path/one`, then with 2 workers into
  `tmp_path/two` (seeded with the reference's artifacts of the kinds `keep`), and compares them:
  every array and listing byte for byte (small shards, so each worker gets several)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(neighbours, "QUERY_CHUNKS_PER_SHARD", 16)
    ref, cache = tmp_path / "one", tmp_path / "two"
    build.build_all(configs.load("tiny_retro", [*overrides, f"data.cache_dir={ref}"]),
                    splits=splits)
    for kind in keep:  # Runner(1) above: the pipeline in this process
      shutil.copytree(ref / kind, cache / kind)
    runner = pipeline.Runner(2)
    built = build.build_all(configs.load("tiny_retro", [*overrides, f"data.cache_dir={cache}"]),
                            splits=splits, runner=runner)
  assert "neighbours (train)" in runner.stage_seconds
  assert built.retrieved.arrays["train"]["neighbours"].shape[0] > 0
  expected, got = _files(ref), _files(cache)
  assert got.keys() == expected.keys() and got == expected


def test_two_workers_search_the_same_neighbours_as_one(retro, tmp_path):
  """The neighbour search on 2 worker processes writes the one-worker build's bytes (the
  train split's: its search is the datastore's own; one pipeline keeps the test short)."""
  _two_worker_build([*retro, "data.test_fraction=0"], tmp_path,
                    keep=("datasets", "tokenizers", "embeddings", "index"), splits=("train",))


@pytest.mark.slow
def test_two_workers_build_everything_the_same_as_one(retro, tmp_path):
  """Token stores, embeddings, index and neighbours from scratch on 2 workers: the same bytes."""
  _two_worker_build(retro, tmp_path, keep=())


def test_killed_worker_fails_the_stage_and_the_rerun_resumes(tmp_path):
  """A stage whose worker is SIGKILLed stops with WorkerDied; the shards finished before are
  kept and the rerun computes only the rest."""
  rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  np.save(tmp_path / "rows.npy", rows)
  script = tmp_path / "stage.py"
  script.write_text(textwrap.dedent(f"""
    import os, signal, sys
    import numpy as np
    from retrieval import pipeline, shards
    rows = np.load({str(tmp_path / 'rows.npy')!r}, mmap_mode="r")
    def compute(s0, s1):
      done = len([p for p in os.listdir({str(tmp_path / 'out' / 'shards')!r})
                  if p.endswith(".done")])
      if os.environ.get("KILL_AT") and done >= int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
      return {{"x": np.asarray(rows[s0:s1]) * 2}}
    try:
      with pipeline.Runner(2).active():
        shards.sharded_rows({str(tmp_path / 'out')!r}, 64, 8, compute, desc="double")
    except pipeline.WorkerDied as e:
      print("WorkerDied:", e)
      sys.exit(3)
  """))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": "3"}
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "WorkerDied: a worker of stage 'double' died" in proc.stdout
  kept = len(list((tmp_path / "out" / "shards").glob("*.done")))
  assert 3 <= kept < 8
  script.write_text(script.read_text().replace("Runner(2)", "Runner(1)"))  # any worker count
  runpy.run_path(str(script))  # here, where nothing kills it
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "x.npy"), rows * 2)


@pytest.mark.slow
def test_a_job_error_in_a_worker_is_one_line(tmp_path):
  """A UserError raised by a job in a worker process is re-raised here as that UserError."""
  def compute(s0, s1):
    raise UserError(f"rows {s0}..{s1} are bad; fix them")

  with pytest.raises(UserError, match=r"^rows 0\.\.4 are bad; fix them|^rows 4\.\.8 are bad"):
    with pipeline.Runner(2).active():
      shards.sharded_rows(tmp_path, 8, 4, compute, desc="bad")


MEASURE_PACK = """
import sys, threading, time
from pathlib import Path
from data import corpora, dataset, tokenizer
dataset.DOCS_PER_SHARD = 64  # about 150 kB of text a shard
dataset.SHARD_TOKENS = 1 << 18  # TFDS files of about 1 MB
peak = [0]
def sample():
  while True:
    for line in open("/proc/self/status"):
      if line.startswith("RssAnon:"):
        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
    time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
base = peak[0]
corpus, tok, out = sys.argv[1:]
docs, _ = corpora.scan(corpus)
split = corpora.split_stream(docs, 0.1, 0)["train"]
dataset.pack(split, tokenizer.Tokenizer.load(tok), Path(out), "train")
dataset.write_documents(Path(out), ["train"], Path(out) / "tfds")
print("GROWTH", peak[0] - base)
"""


@pytest.mark.slow
def test_token_store_memory_does_not_grow_with_the_corpus(tmp_path):
  """Scanning, splitting and packing (tokenizing shards through the pipeline, joined on
  disk), then writing the TFDS copy of the documents, for a corpus 4x larger than a 4 MB
  cap grows the peak anonymous memory by less than the cap over a corpus of 1 MB (one BPE for both, trained on a sample: HF's BPE trainer is
  not ours to bound; glibc limited to 2 arenas, whose fragmentation across the tokenizer's
  threads otherwise grows with the number of shards, up to a bound)."""
  cap = 4 << 20
  rng = np.random.default_rng(0)
  words = np.array([f"w{i}" for i in range(3000)])
  growth = {}
  for size in (1 << 20, 4 * cap):
    corpus = tmp_path / f"corpus{size}.jsonl"
    with open(corpus, "w") as f:
      written = 0
      while written < size:
        text = " ".join(words[rng.integers(0, len(words), 400)])
        written += f.write(f'{{"text": "{text}"}}\n')
    if size == 1 << 20:
      tokenizer.train_bpe(corpora.load_corpus(str(corpus)), 512, tmp_path / "bpe")
    proc = subprocess.run([sys.executable, "-c", MEASURE_PACK, str(corpus),
                           str(tmp_path / "bpe"), str(tmp_path / f"out{size}")],
                          capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                    "MALLOC_ARENA_MAX": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth[size] = int(proc.stdout.split("GROWTH")[-1])
  assert growth[4 * cap] - growth[1 << 20] < cap, growth


def test_ondisk_ivf_searches_like_the_in_memory_index(tmp_path, monkeypatch):
  """An IVF index filled shard by shard with its lists merged on disk returns what the
  same index filled in memory returns, also after its directory is moved."""
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(3000, 16)).astype(np.float32)
  np.save(tmp_path / "v.npy", vectors)
  vectors = np.load(tmp_path / "v.npy", mmap_mode="r")
  monkeypatch.setattr(ondisk, "VECTORS_PER_SHARD", 700)
  ondisk.build_ondisk(vectors, "ondisk:IVF16,Flat", "ip", tmp_path / "a", train_size=3000)
  (tmp_path / "a").rename(tmp_path / "b")
  on_disk = ondisk.load_ondisk(tmp_path / "b", nprobe=4)
  in_ram = index.build_index(vectors, "ip", "IVF16,Flat", nprobe=4, train_size=3000)
  assert on_disk.ntotal == in_ram.ntotal == 3000
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [ondisk.INDEX_FILE,
                                                                ondisk.LISTS_FILE]
  got, want = index.search(on_disk, vectors[:200], 5), index.search(in_ram, vectors[:200], 5)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
