"""BERT's forward pass in JAX, shaped for XLA:CPU, and the loading of its safetensors
weights (Hugging Face names, torch layout) into it; `embedder.Embedder` runs it.

    cfg = BertConfig.from_json(folder / "config.json")
    params = fast_params(flax_params(safetensors.numpy.load_file(path), cfg), cfg)
    vecs_BxE = pool(bert_encode(params, ids_BxL, mask_BxL, cfg), mask_BxL, ("mean",), True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


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
