"""Shared building blocks: RMSNorm, rotary embeddings, attention, MLP, decoder/encoder blocks.

Parameters are float32 and carry logical axis names ("embed", "mlp", "heads", "kv",
"vocab") through `nn.with_logical_partitioning`, so training code can map them onto a
mesh; computation runs in `Spec.dtype` (bfloat16 on request). With `Spec.remat` each
attention and MLP sublayer is rematerialised in the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError

MODEL_NAMES = ("transformer", "retro", "realm", "knnlm")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Width and depth of a bidirectional encoder (RETRO neighbours, REALM query/documents)."""
  width: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int


@dataclasses.dataclass(frozen=True)
class Spec:
  """The model section of a config, checked and frozen (hashable) for the Flax modules."""
  name: str
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  dtype: Any
  remat: bool
  rope_base: float
  chunk_size: int
  cca_layers: tuple[int, ...]
  num_neighbours: int
  neighbour_len: int
  encoder: EncoderSpec
  num_candidates: int
  doc_len: int
  retriever_dim: int
  embedding_dim: int
  doc_encoder: str

  @classmethod
  def from_config(cls, cfg: Any) -> Spec:
    """Builds a Spec from `config.model` (a ConfigDict); UserError on a bad value."""
    if isinstance(cfg, Spec):
      return cfg
    if cfg.name not in MODEL_NAMES:
      raise UserError(f"model.name={cfg.name!r} is unknown; use one of {', '.join(MODEL_NAMES)}")
    if cfg.dtype not in _DTYPES:
      raise UserError(f"model.dtype={cfg.dtype!r} is unsupported; use one of {', '.join(_DTYPES)}")
    if cfg.realm.doc_encoder not in ("stale", "trainable"):
      raise UserError(f"model.realm.doc_encoder={cfg.realm.doc_encoder!r} is unknown; "
                      "use 'stale' or 'trainable'")
    if not 0.0 <= cfg.dropout < 1.0:
      raise UserError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    cca_layers = tuple(int(i) for i in cfg.cca_layers)
    if cfg.name == "retro":
      bad = [i for i in cca_layers if not 1 <= i <= cfg.num_layers]
      if bad or not cca_layers:
        raise UserError(f"model.cca_layers={cca_layers} must be a non-empty subset of the "
                        f"1-based decoder layers 1..{cfg.num_layers}")
    for field in ("width", "num_layers", "num_heads", "head_dim", "mlp_dim", "chunk_size"):
      if cfg[field] <= 0:
        raise UserError(f"model.{field}={cfg[field]} must be positive")
    if cfg.head_dim % 2 or cfg.encoder.head_dim % 2:
      raise UserError("model.head_dim and model.encoder.head_dim must be even (rotary "
                      "embeddings rotate pairs of features)")
    e = cfg.encoder
    return cls(
        name=cfg.name, vocab_size=cfg.vocab_size, width=cfg.width, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
        dropout=float(cfg.dropout), dtype=_DTYPES[cfg.dtype], remat=bool(cfg.remat),
        rope_base=float(cfg.rope_base), chunk_size=cfg.chunk_size, cca_layers=cca_layers,
        num_neighbours=cfg.num_neighbours, neighbour_len=cfg.neighbour_len,
        encoder=EncoderSpec(e.width, e.num_layers, e.num_heads, e.head_dim, e.mlp_dim),
        num_candidates=cfg.realm.num_candidates, doc_len=cfg.realm.doc_len,
        retriever_dim=cfg.realm.retriever_dim, embedding_dim=cfg.realm.embedding_dim,
        doc_encoder=cfg.realm.doc_encoder)


def dense_init(names: tuple[str | None, ...]) -> Callable:
  """LeCun-normal kernel init boxed with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


def embed_init(names: tuple[str | None, ...] = ("vocab", "embed")) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), names)


class RMSNorm(nn.Module):
  """Root-mean-square norm computed in float32, learned per-feature scale."""
  dtype: Any = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                         (x_BxTxD.shape[-1],), jnp.float32)
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rope(x_BxTxHxD: jax.Array, pos_T: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) at integer positions `pos_T`."""
  half = x_BxTxHxD.shape[-1] // 2
  inv_freq = base ** (-np.arange(half, dtype=np.float32) / half)
  angle_TxF = pos_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin_Tx1xF = jnp.sin(angle_TxF)[:, None, :]
  cos_Tx1xF = jnp.cos(angle_TxF)[:, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_Tx1xF - x2 * sin_Tx1xF, x2 * cos_Tx1xF + x1 * sin_Tx1xF], -1)
  return out.astype(x_BxTxHxD.dtype)


class Attention(nn.Module):
  """Multi-head attention with rotary positions through `jax.nn.dot_product_attention`.

  Queries come from `x`, keys and values from `kv` (pass the same array for
  self-attention); `causal` adds the causal mask, `mask_Bx1xTxS` (True = attend) any other.
  """
  num_heads: int
  head_dim: int
  out_dim: int
  rope_base: float
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, kv_BxSxE: jax.Array, pos_T: jax.Array,
               pos_S: jax.Array, mask_Bx1xTxS: jax.Array | None = None) -> jax.Array:
    def proj(name: str, inp: jax.Array) -> jax.Array:
      return nn.DenseGeneral((self.num_heads, self.head_dim), use_bias=False, dtype=self.dtype,
                             kernel_init=dense_init(("embed", "heads", "kv")), name=name)(inp)

    q_BxTxHxK = rope(proj("query", x_BxTxD), pos_T, self.rope_base)
    k_BxSxHxK = rope(proj("key", kv_BxSxE), pos_S, self.rope_base)
    v_BxSxHxK = proj("value", kv_BxSxE)
    out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK,
                                               mask=mask_Bx1xTxS, is_causal=self.causal)
    return nn.DenseGeneral(self.out_dim, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           kernel_init=dense_init(("heads", "kv", "embed")),
                           name="out")(out_BxTxHxK)


class Mlp(nn.Module):
  """Two-layer GELU feed-forward."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype,
                       kernel_init=dense_init(("embed", "mlp")), name="wi")(x_BxTxD)
    h_BxTxF = nn.gelu(h_BxTxF)
    return nn.Dense(x_BxTxD.shape[-1], use_bias=False, dtype=self.dtype,
                    kernel_init=dense_init(("mlp", "embed")), name="wo")(h_BxTxF)


def _maybe_remat(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  return nn.remat(cls) if remat else cls


class DecoderBlock(nn.Module):
  """Pre-norm decoder block: causal self-attention, optional cross-attention, MLP.

  The sublayers are separate methods so RETRO can run its encoder between self-attention
  and chunked cross-attention; `__call__` is the plain block (no cross-attention).
  """
  spec: Spec
  cross: bool = False

  def setup(self):
    s = self.spec
    attention = _maybe_remat(Attention, s.remat)
    self.attn_norm = RMSNorm(s.dtype)
    self.attn = attention(s.num_heads, s.head_dim, s.width, s.rope_base, causal=True,
                          dtype=s.dtype)
    if self.cross:
      self.cross_norm = RMSNorm(s.dtype)
      self.cross_attn = attention(s.num_heads, s.head_dim, s.width, s.rope_base, dtype=s.dtype)
    self.mlp_norm = RMSNorm(s.dtype)
    self.mlp = _maybe_remat(Mlp, s.remat)(s.mlp_dim, dtype=s.dtype)
    self.drop = nn.Dropout(s.dropout)

  def self_attention(self, x_BxLxD: jax.Array, deterministic: bool,
                     mask_Bx1xLxL: jax.Array | None = None) -> jax.Array:
    pos_L = jnp.arange(x_BxLxD.shape[1])
    h_BxLxD = self.attn_norm(x_BxLxD)
    return x_BxLxD + self.drop(self.attn(h_BxLxD, h_BxLxD, pos_L, pos_L, mask_Bx1xLxL),
                               deterministic=deterministic)

  def cross_attention(self, x_NxTxD: jax.Array, ctx_NxSxE: jax.Array, pos_T: jax.Array,
                      pos_S: jax.Array, mask_Nx1xTxS: jax.Array | None,
                      deterministic: bool) -> jax.Array:
    """The cross-attention update (without the residual: the caller places it)."""
    h_NxTxD = self.cross_norm(x_NxTxD)
    return self.drop(self.cross_attn(h_NxTxD, ctx_NxSxE, pos_T, pos_S, mask_Nx1xTxS),
                     deterministic=deterministic)

  def feed_forward(self, x_BxLxD: jax.Array, deterministic: bool
                   ) -> tuple[jax.Array, jax.Array]:
    """Returns (block output, normalised MLP input = the kNN-LM key)."""
    key_BxLxD = self.mlp_norm(x_BxLxD)
    return x_BxLxD + self.drop(self.mlp(key_BxLxD), deterministic=deterministic), key_BxLxD

  def __call__(self, x_BxLxD: jax.Array, deterministic: bool,
               mask_Bx1xLxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    return self.feed_forward(self.self_attention(x_BxLxD, deterministic, mask_Bx1xLxL),
                             deterministic)


class EncoderBlock(nn.Module):
  """Pre-norm bidirectional block over groups of K sequences of length R.

  Self-attention runs within each sequence (padding keys masked); with `cross`, the K*R
  tokens of a group then attend together to that group's context (RETRO: the decoder
  states of the chunk the neighbours were retrieved for).
  """
  spec: EncoderSpec
  rope_base: float
  dropout: float
  dtype: Any = jnp.float32
  remat: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x_NxKxRxE: jax.Array, valid_NxKxR: jax.Array,
               ctx_NxSxD: jax.Array | None, deterministic: bool) -> jax.Array:
    s = self.spec
    N, K, R, E = x_NxKxRxE.shape
    attention = _maybe_remat(Attention, self.remat)
    drop = nn.Dropout(self.dropout)
    pos_R = jnp.arange(R)
    x_MxRxE = x_NxKxRxE.reshape(N * K, R, E)
    valid_MxR = valid_NxKxR.reshape(N * K, R)
    # Padding keys are masked; every token still sees itself, so no row is empty.
    mask_Mx1xRxR = valid_MxR[:, None, None, :] | jnp.eye(R, dtype=bool)[None, None]
    h_MxRxE = RMSNorm(self.dtype, name="attn_norm")(x_MxRxE)
    x_MxRxE = x_MxRxE + drop(attention(s.num_heads, s.head_dim, E, self.rope_base,
                                       dtype=self.dtype, name="attn")(
                                           h_MxRxE, h_MxRxE, pos_R, pos_R, mask_Mx1xRxR),
                             deterministic=deterministic)
    x_NxTxE = x_MxRxE.reshape(N, K * R, E)
    if self.cross:
      h_NxTxE = RMSNorm(self.dtype, name="cross_norm")(x_NxTxE)
      pos_T = jnp.tile(pos_R, K)
      pos_S = jnp.arange(ctx_NxSxD.shape[1])
      x_NxTxE = x_NxTxE + drop(attention(s.num_heads, s.head_dim, E, self.rope_base,
                                         dtype=self.dtype, name="cross_attn")(
                                             h_NxTxE, ctx_NxSxD, pos_T, pos_S),
                               deterministic=deterministic)
    h_NxTxE = RMSNorm(self.dtype, name="mlp_norm")(x_NxTxE)
    x_NxTxE = x_NxTxE + drop(_maybe_remat(Mlp, self.remat)(s.mlp_dim, dtype=self.dtype,
                                                           name="mlp")(h_NxTxE),
                             deterministic=deterministic)
    return x_NxTxE.reshape(N, K, R, E)


class Encoder(nn.Module):
  """Bidirectional encoder stack: input projection to its own width, blocks, final norm."""
  spec: EncoderSpec
  rope_base: float
  dropout: float
  dtype: Any = jnp.float32
  remat: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x_NxKxRxD: jax.Array, valid_NxKxR: jax.Array,
               ctx_NxSxD: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    x = nn.Dense(self.spec.width, use_bias=False, dtype=self.dtype,
                 kernel_init=dense_init(("embed", None)), name="in_proj")(x_NxKxRxD)
    if self.cross:
      ctx_NxSxD = RMSNorm(self.dtype, name="ctx_norm")(ctx_NxSxD)
    for i in range(self.spec.num_layers):
      x = EncoderBlock(self.spec, self.rope_base, self.dropout, self.dtype, self.remat,
                       self.cross, name=f"block_{i}")(x, valid_NxKxR, ctx_NxSxD, deterministic)
    return RMSNorm(self.dtype, name="final_norm")(x)
