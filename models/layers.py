"""The model spec and the transformer blocks every family is built from.

`Spec` is `config.model` checked and frozen; `DecoderBlock` (causal self-attention,
optional cross-attention, MLP), `EncoderBlock` and `Encoder` (bidirectional, optionally
cross-attending to a context) build on `models.ops`. With `Spec.remat` each attention and
MLP sublayer is rematerialised in the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from common.errors import UserError
from models.attention import IMPLEMENTATIONS, KeyMask
from models.ops import Attention, Kernel, Mlp, Positions, RMSNorm, dense, dense_init, embed_init

__all__ = ["Spec", "EncoderSpec", "DecoderBlock", "EncoderBlock", "Encoder", "Kernel",
           "RMSNorm", "dense", "dense_init", "embed_init"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Width and depth of a bidirectional encoder (RETRO neighbours, REALM query/documents)."""
  width: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  attention: str = "auto"  # the attention kernel (models.attention), as the decoder's


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
  cca_zero_init: bool
  num_neighbours: int
  neighbour_len: int
  encoder: EncoderSpec
  # The family's own fields: config.model.<name> (e.g. model.realm), frozen as pairs.
  options: tuple[tuple[str, Any], ...] = ()
  attention: str = "auto"  # the attention kernel: models.attention.IMPLEMENTATIONS
  loss_chunk: int = 0  # >0: the LM loss projects this many positions at a time (lm_loss)
  # RETRO: CCA keys smeared with the previous neighbour token (models.ops.Attention).
  cca_smear_keys: bool = False
  # RETRO: a learned null key and value in CCA, so a chunk can attend to nothing.
  cca_null_kv: bool = False
  # What the decoder returns: "logits", or "hidden" (the final norm's output; lm_loss sets it).
  head: str = "logits"

  def option(self, key: str) -> Any:
    """A field of the family's own config section (`config.model.<name>.<key>`)."""
    return dict(self.options)[key]

  @classmethod
  def from_config(cls, cfg: Any) -> Spec:
    """Builds a Spec from `config.model` (a ConfigDict); UserError on a bad value."""
    if isinstance(cfg, Spec):
      return cfg
    if cfg.dtype not in _DTYPES:
      raise UserError(f"model.dtype={cfg.dtype!r} is unsupported; use one of {', '.join(_DTYPES)}")
    if not 0.0 <= cfg.dropout < 1.0:
      raise UserError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    for field in ("width", "num_layers", "num_heads", "head_dim", "mlp_dim", "chunk_size"):
      if cfg[field] <= 0:
        raise UserError(f"model.{field}={cfg[field]} must be positive")
    attention = cfg.get("attention", "auto")
    if attention not in IMPLEMENTATIONS:
      raise UserError(f"model.attention={attention!r} is unknown; use one of "
                      f"{', '.join(IMPLEMENTATIONS)}")
    if cfg.head_dim % 2 or cfg.encoder.head_dim % 2:
      raise UserError("model.head_dim and model.encoder.head_dim must be even (rotary "
                      "embeddings rotate pairs of features)")
    e = cfg.encoder
    return cls(
        name=cfg.name, vocab_size=cfg.vocab_size, width=cfg.width, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
        dropout=float(cfg.dropout), dtype=_DTYPES[cfg.dtype], remat=bool(cfg.remat),
        rope_base=float(cfg.rope_base), chunk_size=cfg.chunk_size,
        cca_layers=tuple(int(i) for i in cfg.cca_layers),
        cca_zero_init=bool(cfg.cca_zero_init),
        num_neighbours=cfg.num_neighbours, neighbour_len=cfg.neighbour_len,
        encoder=EncoderSpec(e.width, e.num_layers, e.num_heads, e.head_dim, e.mlp_dim,
                            attention),
        options=_frozen(cfg.get(cfg.name)), attention=attention,
        loss_chunk=int(cfg.get("loss_chunk", 0)),
        cca_smear_keys=bool(cfg.get("cca_smear_keys", False)),
        cca_null_kv=bool(cfg.get("cca_null_kv", False)))


def _frozen(section: Any) -> tuple[tuple[str, Any], ...]:
  """A config section as sorted (key, value) pairs (lists become tuples): hashable."""
  if not isinstance(section, ml_collections.ConfigDict):
    return ()
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in section.to_dict().items()))


def _maybe_remat(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  # Attention's positions (arguments 3 and 4, counting self) are static tuples.
  static = (3, 4) if cls is Attention else ()
  return nn.remat(cls, static_argnums=static) if remat else cls


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
                          dtype=s.dtype, implementation=s.attention)
    if self.cross:
      self.cross_norm = RMSNorm(s.dtype)
      self.cross_attn = attention(s.num_heads, s.head_dim, s.width, s.rope_base, dtype=s.dtype,
                                  implementation=s.attention, zero_out=s.cca_zero_init,
                                  key_smear=s.neighbour_len if s.cca_smear_keys else 0,
                                  null_kv=s.cca_null_kv)
    self.mlp_norm = RMSNorm(s.dtype)
    self.mlp = _maybe_remat(Mlp, s.remat)(s.mlp_dim, dtype=s.dtype)
    self.drop = nn.Dropout(s.dropout)

  def self_attention(self, x_BxLxD: jax.Array, deterministic: bool,
                     mask_Bx1xLxS: jax.Array | None = None,
                     pos_L: Positions | jax.Array | None = None,
                     decode: bool = False) -> jax.Array:
    """Causal self-attention plus residual. Positions default to 0..L-1; decoding passes
    the new tokens' positions (an array) and a mask over the S cached ones."""
    pos_L = tuple(range(x_BxLxD.shape[1])) if pos_L is None else pos_L
    h_BxLxD = self.attn_norm(x_BxLxD)
    # Only decoding passes the flag: under remat (never used to decode) it would be traced.
    attn = functools.partial(self.attn, decode=True) if decode else self.attn
    return x_BxLxD + self.drop(attn(h_BxLxD, None, pos_L, pos_L, mask_Bx1xLxS),
                               deterministic=deterministic)

  def cross_attention(self, x_NxTxD: jax.Array, ctx_NxSxE: jax.Array, pos_T: Positions,
                      pos_S: Positions, mask_Nx1xTxS: jax.Array | None,
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
               mask_Bx1xLxS: jax.Array | None = None,
               pos_L: Positions | jax.Array | None = None,
               decode: bool = False) -> tuple[jax.Array, jax.Array]:
    return self.feed_forward(
        self.self_attention(x_BxLxD, deterministic, mask_Bx1xLxS, pos_L, decode), deterministic)


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
    pos_R = tuple(range(R))
    x_MxRxE = x_NxKxRxE.reshape(N * K, R, E)
    valid_MxR = valid_NxKxR.reshape(N * K, R)
    # Padding keys are masked; every token still sees itself, so no row is empty.
    mask = KeyMask(valid_MxR, self_visible=True)
    h_MxRxE = RMSNorm(self.dtype, name="attn_norm")(x_MxRxE)
    x_MxRxE = x_MxRxE + drop(attention(s.num_heads, s.head_dim, E, self.rope_base,
                                       dtype=self.dtype, implementation=s.attention,
                                       name="attn")(h_MxRxE, None, pos_R, pos_R, mask),
                             deterministic=deterministic)
    x_NxTxE = x_MxRxE.reshape(N, K * R, E)
    if self.cross:
      h_NxTxE = RMSNorm(self.dtype, name="cross_norm")(x_NxTxE)
      pos_T = pos_R * K
      pos_S = tuple(range(ctx_NxSxD.shape[1]))
      x_NxTxE = x_NxTxE + drop(attention(s.num_heads, s.head_dim, E, self.rope_base,
                                         dtype=self.dtype, implementation=s.attention,
                                         name="cross_attn")(
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
    w_DxE = Kernel((self.spec.width,), ("embed", None), name="in_proj")(x_NxKxRxD.shape[-1:])
    x = dense(x_NxKxRxD, w_DxE, self.dtype)
    if self.cross:
      ctx_NxSxD = RMSNorm(self.dtype, name="ctx_norm")(ctx_NxSxD)
    for i in range(self.spec.num_layers):
      x = EncoderBlock(self.spec, self.rope_base, self.dropout, self.dtype, self.remat,
                       self.cross, name=f"block_{i}")(x, valid_NxKxR, ctx_NxSxD, deterministic)
    return RMSNorm(self.dtype, name="final_norm")(x)
