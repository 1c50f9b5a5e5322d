"""Tokenized corpus: a TFDS array_record dataset of documents, packed into token streams.

    prep = prepare(config)          # corpus -> split -> tokenizer -> TFDS -> packed streams
    idx_B = batch_indices(prep.train.num_sequences, B, seed, step)
    batch = prep.train.batch(idx_B)  # {"inputs", "targets", "weights", "index"}
    for idx_B in eval_indices(prep.validation.num_sequences, B):
      batch = prep.validation.batch(idx_B)

Cache layout (`<cache>/datasets/<dataset hash>/`, committed atomically with a manifest):
`tfds/tokenized_documents/1.0.0/` (one example per document: `doc_id` Text, `tokens`
int32[None], array_record shards written by `write_documents`; read back with
`Prepared.documents`), and per split `<split>.tokens.npy`
(int32 [T]: every document followed by EOS), `<split>.token_doc.npy` (int32 [T]: index of
the token's document) and `<split>.doc_ids.json`. The stream does not depend on seq_len:
sequence s is `tokens[s*L : s*L+L+1]`, so its chunks are the stream's 64-token chunks
`s*C .. s*C+C-1` and one dataset serves every L.

Batch order is a pure function of (seed, step): epoch e visits the sequences in the
permutation drawn from `default_rng([seed, e])`, so a checkpoint stores `step` only.
Evaluation batches (`eval_indices`) are sequential and all of size B: the last one is
padded with index -1, which `batch` turns into all-zero rows (weights 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from common import artifacts
from common.errors import UserError
from data import corpora
from data import tokenizer as tokenizer_lib
from retrieval import pipeline, shards

SPLITS = ("train", "validation", "test")  # "test" exists only with data.test_fraction > 0
_FORMAT = "packed-v1"  # bump when the stored layout changes, to invalidate caches
DOCS_PER_SHARD = 512  # documents a pipeline item tokenizes
_TFDS_RECORD = "tfds.files.json"  # the finished TFDS files' checksums (a resume verifies them)


# The TFDS dataset: one example per document, in corpus order (`write_documents`).
TFDS_NAME, TFDS_VERSION = "tokenized_documents", "1.0.0"
# Variable-length int32 tokens; Tensor(shape=(None,)) rather than Sequence(int32) because
# it decodes to one ndarray, 10x faster than Sequence's list of scalars.
FEATURES = tfds.features.FeaturesDict({
    "doc_id": tfds.features.Text(),
    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
})
SHARD_TOKENS = 1 << 26  # tokens per TFDS shard file (about 256 MB)


def write_documents(packed: Path, splits: Sequence[str], data_dir: Path) -> Path:
  """Writes the TFDS dataset of `splits` from their packed streams in `packed` (`pack`'s
  output) under `data_dir`, and returns its directory (`builder_from_directory` reads it).

  Each split is cut at document boundaries into array_record shards of about
  `SHARD_TOKENS` tokens, written one document at a time from the memory-mapped stream, then
  the metadata (`tfds.folder_dataset.write_metadata`): memory does not grow with the
  corpus. (TFDS's builder writer holds a split in memory and spills beyond 1 GB only
  through TensorFlow, which this project does not install.)
  """
  out = data_dir / TFDS_NAME / TFDS_VERSION
  out.mkdir(parents=True, exist_ok=True)
  infos = []
  for name in splits:
    split = TokenSplit.load(packed, name, seq_len=1, chunk_size=1)
    D, T = len(split.doc_ids), len(split.tokens)
    starts_D1 = split.doc_starts()
    cuts = np.searchsorted(starts_D1, np.arange(1, -(-T // SHARD_TOKENS)) * SHARD_TOKENS)
    edges = np.unique(np.concatenate([[0], cuts, [D]]))
    template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=TFDS_NAME, split=name,
                                             filetype_suffix="array_record")
    lengths, size = [], 0
    for i, (d0, d1) in enumerate(zip(edges[:-1], edges[1:])):
      path = template.sharded_filepath(shard_index=i, num_shards=len(edges) - 1)
      examples = ((d, FEATURES.serialize_example(  # each document without its EOS
          {"doc_id": split.doc_ids[d], "tokens": np.asarray(
              split.tokens[starts_D1[d]:starts_D1[d + 1] - 1])})) for d in range(d0, d1))
      tfds.core.file_adapters.ArrayRecordFileAdapter.write_examples(path, examples)
      lengths.append(int(d1 - d0))
      size += path.stat().length
    infos.append(tfds.core.SplitInfo(name=name, shard_lengths=lengths, num_bytes=size,
                                     filename_template=template))
  tfds.folder_dataset.write_metadata(data_dir=out, features=FEATURES, split_infos=infos,
                                     check_data=False,
                                     description="retrozoo tokenized documents")
  return out


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """One split packed into a stream: each document's tokens, then EOS."""

  name: str
  tokens: np.ndarray  # int32 [T]
  token_doc: np.ndarray  # int32 [T], index into doc_ids
  doc_ids: list[str]
  seq_len: int
  chunk_size: int = 64

  @classmethod
  def load(cls, directory: str | Path, name: str, seq_len: int, chunk_size: int
           ) -> TokenSplit:
    """Memory-maps the split's streams from a dataset directory."""
    directory = Path(directory)
    return cls(name=name,
               tokens=np.load(directory / f"{name}.tokens.npy", mmap_mode="r"),
               token_doc=np.load(directory / f"{name}.token_doc.npy", mmap_mode="r"),
               doc_ids=json.loads((directory / f"{name}.doc_ids.json").read_text()),
               seq_len=seq_len, chunk_size=chunk_size)

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_sequences(self) -> int:
    """Sequences of L+1 tokens starting every L tokens."""
    return max(0, (self.num_tokens - 1) // self.seq_len)

  @property
  def num_chunks(self) -> int:
    """Complete chunks in the stream (more than num_sequences * C: the tail counts too)."""
    return self.num_tokens // self.chunk_size

  def chunk_tokens(self) -> np.ndarray:
    """int32 [N, m]: chunk n is tokens[n*m : (n+1)*m] (a view of the memmap)."""
    n, m = self.num_chunks, self.chunk_size
    return self.tokens[:n * m].reshape(n, m)

  def doc_starts(self) -> np.ndarray:
    """int64 [D+1]: where each document starts in the stream, then the stream's length.
    (Needles of the stream's dtype: int64 ones would make searchsorted copy the stream.)"""
    return np.searchsorted(self.token_doc,
                           np.arange(len(self.doc_ids) + 1, dtype=self.token_doc.dtype))

  def chunk_doc(self) -> np.ndarray:
    """int32 [N]: the document index of each chunk's first token."""
    return self.token_doc[:self.num_chunks * self.chunk_size:self.chunk_size]

  def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Sequences `indices` (-1: padding row) as inputs/targets/weights [B, L] and index [B]."""
    idx_B = np.asarray(indices, dtype=np.int64)
    if idx_B.ndim != 1 or np.any(idx_B < -1) or np.any(idx_B >= self.num_sequences):
      raise IndexError(f"sequence indices must be a 1-D array in [-1, {self.num_sequences}), "
                       f"got {idx_B}")
    L = self.seq_len
    pos_BxL1 = np.maximum(idx_B, 0)[:, None] * L + np.arange(L + 1)
    rows_BxL1 = np.where(idx_B[:, None] >= 0, self.tokens[pos_BxL1], 0).astype(np.int32)
    targets_BxL = rows_BxL1[:, 1:]
    return {"inputs": rows_BxL1[:, :-1], "targets": targets_BxL,
            "weights": (targets_BxL != 0).astype(np.float32), "index": idx_B}


@dataclasses.dataclass(frozen=True)
class Prepared:
  """The output of `prepare`: tokenizer, both splits, hashes and the dataset directory."""

  tokenizer: tokenizer_lib.Tokenizer
  train: TokenSplit
  validation: TokenSplit
  hashes: dict[str, str]  # corpus, tokenizer, dataset
  directory: Path
  test: TokenSplit | None = None  # held-out documents for final numbers (data.test_fraction)

  @property
  def names(self) -> tuple[str, ...]:
    """The splits this dataset has, in SPLITS order."""
    return tuple(name for name in SPLITS if getattr(self, name) is not None)

  def split(self, name: str) -> TokenSplit:
    if name not in SPLITS:
      raise UserError(f"unknown split {name!r}; use one of: {', '.join(SPLITS)}")
    if name not in self.names:
      raise UserError(f"this dataset has no {name} split (data.test_fraction=0); set "
                      f"--config.data.test_fraction=0.1 (the model must be trained on that "
                      f"split layout)")
    return getattr(self, name)

  def documents(self, name: str) -> Sequence[dict]:
    """Random access to the split's documents ({"doc_id": bytes, "tokens": int32[None]})."""
    self.split(name)
    directory = self.directory / "tfds" / TFDS_NAME / TFDS_VERSION
    return tfds.builder_from_directory(directory).as_data_source(split=name)


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Corpus -> split -> tokenizer -> TFDS dataset -> packed streams; every step cached.

  A `data.corpus` that names a committed dataset artifact (a run bundle's
  `cache/datasets/<hash>`) is used as it is: no corpus is read and no tokenizer trained;
  `data.tokenizer` is then the folder of the tokenizer that made it.
  """
  d = config.data  # configs.validate has checked seq_len against the chunk size
  committed = artifacts.committed(d.corpus, "dataset")
  if committed is not None:
    return _from_artifact(config, committed)
  docs, corpus_hash = corpora.scan(d.corpus, d.cache_dir, d.max_documents)
  splits = corpora.split_stream(docs, d.val_fraction, d.split_seed, d.test_fraction)
  if not all(splits.values()):
    need = len(splits)
    raise UserError(f"corpus {d.corpus!r} has {len(docs)} document(s); at least {need} are "
                    f"needed (one each for {', '.join(splits)}): add documents or raise "
                    f"--config.data.max_documents" +
                    (" (or set --config.data.test_fraction=0)" if need == 3 else ""))
  tok = tokenizer_lib.get_tokenizer(d.tokenizer, splits["train"], config.model.vocab_size,
                                    d.cache_dir, rebuild=artifacts.rebuild_command(config.name))
  inputs = {"corpus": corpus_hash, "tokenizer": tok.hash}
  fractions = {"val_fraction": d.val_fraction}
  if d.test_fraction:  # (absent when 0: datasets built before the test split keep their hash)
    fractions["test_fraction"] = d.test_fraction
  dataset_hash = artifacts.fingerprint({**inputs, **fractions, "split_seed": d.split_seed,
                                        "format": _FORMAT})
  final = artifacts.cache_root(d.cache_dir) / "datasets" / dataset_hash
  if artifacts.read_manifest(final) is None:
    print(f"building dataset {final}", flush=True)
    _build(splits, tok, final, inputs, dataset_hash)
  else:
    print(f"reusing cached dataset {final}", flush=True)
  artifacts.check_manifest(final, inputs, rebuild_hint=f"delete {final} and rerun",
                           rebuild=artifacts.rebuild_command(config.name))
  return _load(config, tok, final, {**inputs, "dataset": dataset_hash})


def _from_artifact(config: ml_collections.ConfigDict, final: Path) -> Prepared:
  """The committed dataset `final` with the tokenizer `data.tokenizer` (which must be the one
  that made it): no corpus, no build."""
  if config.data.tokenizer == "bpe":
    raise UserError(f"data.corpus names the dataset {final}; set --config.data.tokenizer to "
                    f"the folder of the tokenizer that built it")
  tok = tokenizer_lib.get_tokenizer(config.data.tokenizer, [], config.model.vocab_size)
  manifest = artifacts.check_manifest(final, {"tokenizer": tok.hash},
                                      rebuild_hint=f"point data.tokenizer at the tokenizer "
                                                   f"that built {final}")
  return _load(config, tok, final, {**manifest["inputs"], "dataset": manifest["hash"]})


def _load(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, final: Path,
          hashes: dict[str, str]) -> Prepared:
  """The packed splits of the committed dataset `final`, each checked to hold a sequence."""
  d = config.data
  parts = {name: TokenSplit.load(final, name, d.seq_len, config.model.chunk_size)
           for name in SPLITS if (final / f"{name}.tokens.npy").exists()}
  for part in parts.values():
    if part.num_sequences < 1:
      raise UserError(f"the {part.name} split of corpus {d.corpus!r} has {part.num_tokens} "
                      f"tokens, fewer than one sequence of data.seq_len+1={d.seq_len + 1}; "
                      f"lower --config.data.seq_len or use more text (data.max_documents, "
                      f"data.val_fraction)")
  return Prepared(tokenizer=tok, train=parts["train"], validation=parts["validation"],
                  test=parts.get("test"), hashes=hashes, directory=final)


def batch_indices(num_sequences: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """int64 [B]: the sequences of training batch `step`, a pure function of the arguments.

  Batch `step` takes positions step*B .. step*B+B-1 of the endless sequence of epoch
  permutations, so every epoch visits each sequence once.
  """
  if num_sequences < 1 or batch_size < 1 or step < 0:
    raise ValueError(f"need num_sequences >= 1, batch_size >= 1, step >= 0; got "
                     f"{num_sequences}, {batch_size}, {step}")
  pos_B = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epoch_B, offset_B = np.divmod(pos_B, num_sequences)
  idx_B = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epoch_B):
    sel = epoch_B == epoch
    idx_B[sel] = _permutation(num_sequences, seed, int(epoch))[offset_B[sel]]
  return idx_B


def eval_indices(num_sequences: int, batch_size: int) -> Iterator[np.ndarray]:
  """Sequential int64 [B] batches covering 0..num_sequences-1 once; the last is -1-padded."""
  for start in range(0, num_sequences, batch_size):
    idx_B = np.arange(start, start + batch_size, dtype=np.int64)
    idx_B[idx_B >= num_sequences] = -1
    yield idx_B


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def _build(splits: dict[str, corpora.Stream], tok: tokenizer_lib.Tokenizer,
           final: Path, inputs: dict[str, str], dataset_hash: str) -> None:
  """Packs every split (`pack`), then writes the TFDS dataset from the packed streams, into
  `<final>.partial`, then commits."""
  with artifacts.building(final) as work:
    counts = {name: pack(docs, tok, work, name) for name, docs in splits.items()}
    _drop_unverified_tfds(work)
    if not (work / _TFDS_RECORD).exists():
      write_documents(work, list(splits), work / "tfds")
    artifacts.atomic_write_text(work / _TFDS_RECORD,
                                json.dumps(artifacts.files_record(work / "tfds"), indent=1))
    artifacts.write_manifest(work, "dataset", inputs, hash=dataset_hash, splits=counts,
                             tokens_dtype="int32", eos_id=tok.eos_id,
                             vocab_size=tok.vocab_size, tfds_builder=TFDS_NAME)


def pack(docs: corpora.Stream, tok: tokenizer_lib.Tokenizer, work: Path, name: str,
         align: int = 1) -> dict[str, int]:
  """Writes `<name>.tokens.npy`, `<name>.token_doc.npy` and `<name>.doc_ids.json` into
  `work`: each document's tokens then EOS, padded with 0 (of that document) to a multiple
  of `align` tokens (a datastore's chunk size: every chunk then holds one document). The
  documents are streamed into an on-disk text
  store, tokenized DOCS_PER_SHARD at a time by the pipeline (resumable shards, in parallel
  with several workers) and joined through a memmap: memory does not grow with the corpus.
  Returns the split's document and token counts."""
  stage = work / ".pack" / name
  offsets_path, text_path = stage / "text_offsets.npy", stage / "text.bin"
  if not offsets_path.exists():  # written last: the text store is complete
    stage.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with open(text_path, "wb") as f:
      for doc in docs:
        offsets.append(offsets[-1] + f.write(doc.text.encode()))
    artifacts.atomic_save_npy(offsets_path, np.asarray(offsets, np.int64))
  pipeline.by_reference(tok, tokenizer_lib.Tokenizer.load, tok.path)
  eos = tok.eos_id

  def compute(d0: int, d1: int) -> dict[str, np.ndarray]:
    offsets_D = np.load(offsets_path, mmap_mode="r")
    text = np.memmap(text_path, np.uint8, "r")  # documents are never empty
    parts = [np.asarray([*ids, eos, *[0] * (-(len(ids) + 1) % align)], np.int32)
             for ids in tok.encode_batch([bytes(text[offsets_D[i]:offsets_D[i + 1]]).decode()
                                          for i in range(d0, d1)])]
    return {"tokens": np.concatenate(parts),
            "token_doc": np.repeat(np.arange(d0, d1, dtype=np.int32), [len(p) for p in parts])}

  arrays = shards.sharded_rows(stage, len(docs), DOCS_PER_SHARD, compute,
                               desc=f"tokenizing {name}", unit="doc",
                               job={"tokenizer": tok.hash, "align": align})
  tokens = int(arrays["tokens"].shape[0])
  del arrays
  for array in ("tokens", "token_doc"):
    os.replace(stage / f"{array}.npy", work / f"{name}.{array}.npy")
  artifacts.atomic_write_text(work / f"{name}.doc_ids.json", json.dumps(list(docs.doc_ids)))
  shutil.rmtree(stage)
  if not any((work / ".pack").iterdir()):
    (work / ".pack").rmdir()
  return {"documents": len(docs), "tokens": tokens}


def _drop_unverified_tfds(work: Path) -> None:
  """Deletes an interrupted build's TFDS files unless they match the checksums recorded
  when their preparation finished (then TFDS reuses them)."""
  tfds_dir, record = work / "tfds", work / _TFDS_RECORD
  if not tfds_dir.exists():
    return
  problem = None if record.exists() else "its preparation did not finish"
  if problem is None:
    for name, rec in json.loads(record.read_text()).items():
      problem = artifacts.file_problem(tfds_dir / name, rec, full=True, name=f"tfds/{name}",
                                       source=_TFDS_RECORD)
      if problem:
        break
  if problem:
    print(f"{tfds_dir}: {problem}; preparing it again", flush=True)
    shutil.rmtree(tfds_dir)
    record.unlink(missing_ok=True)
