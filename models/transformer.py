"""The decoder-only LM family: the baseline, the kNN-LM base, and the trunk of RETRO and REALM.

Input embedding and output projection are untied (RETRO-pytorch and the paper's
baselines do the same; it also keeps the kNN key free of the output embedding).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import models
from models.attention import KeyMask
from models.family import Family
from models.layers import DecoderBlock, Kernel, RMSNorm, Spec, dense, embed_init


class Transformer(nn.Module):
  """Decoder LM. `cfg` is `config.model` (a ConfigDict) or a `layers.Spec`.

  Parameter names: `embed`, `blocks_{i}` (i = 0-based layer), `final_norm`, `lm_head`;
  RETRO uses the same names for its decoder, so each applies to the other's parameters.
  """
  cfg: Any

  def setup(self):
    s = self.spec = Spec.from_config(self.cfg)
    self.embed = nn.Embed(s.vocab_size, s.width, dtype=s.dtype, embedding_init=embed_init())
    self.blocks = [DecoderBlock(s, cross=self.has_cca(i)) for i in range(s.num_layers)]
    self.final_norm = RMSNorm(s.dtype)
    self.lm_head = Kernel((s.vocab_size,), ("embed", "vocab"))
    self.drop = nn.Dropout(s.dropout)

  def has_cca(self, layer: int) -> bool:
    """Whether 0-based decoder layer `layer` holds chunked cross-attention (RETRO only)."""
    return False

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection; float32 logits whatever the compute dtype. With
    `spec.head == "hidden"` the normalised states alone (`models.lm_loss` projects them
    a block at a time with `project`)."""
    h_BxLxD = self.final_norm(x_BxLxD)
    return h_BxLxD if self.spec.head == "hidden" else self.project(h_BxLxD)

  def project(self, h_BxLxD: jax.Array) -> jax.Array:
    """The output projection of normalised states: float32 logits [..., V]."""
    s = self.spec
    return dense(h_BxLxD, self.lm_head((s.width,)), s.dtype).astype(jnp.float32)

  @nn.compact
  def decode_positions(self, inputs_BxT: jax.Array, valid_BxT: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """Decoding: (positions [T] of the new tokens, mask [B, 1, T, S] over the cache).

    The "cache" collection holds the next position and which of the S cached positions
    are valid keys (`init` with decode sizes S by its input). A query sees the valid
    positions up to its own, and always itself.
    """
    B, T = inputs_BxT.shape
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT.astype(bool)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    valid = self.variable("cache", "valid", jnp.zeros, (B, T), bool)
    start = index.value
    valid.value = jax.lax.dynamic_update_slice(valid.value, valid_BxT, (0, start))
    index.value = start + T
    pos_T = start + jnp.arange(T)
    pos_S = jnp.arange(valid.value.shape[1])
    sees_1x1xTxS = (pos_S[None, :] <= pos_T[:, None])[None, None]
    self_1x1xTxS = (pos_S[None, :] == pos_T[:, None])[None, None]
    return pos_T, sees_1x1xTxS & (valid.value[:, None, None, :] | self_1x1xTxS)

  def __call__(self, inputs_BxL: jax.Array, deterministic: bool = True,
               return_key: bool = False, valid_BxL: jax.Array | None = None,
               decode: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, L, V]; with `return_key` also the kNN-LM key [B, L, D] (float32).

    The key is the normalised input to the last block's feed-forward layer (Khandelwal
    et al. 2020). `valid_BxL` (optional) masks invalid tokens as attention keys (REALM's
    padded document prefix); every token still attends to itself.

    `decode=True` (with the "cache" collection mutable, see `models.init_cache`): the
    inputs are the next L tokens after those already cached, and the outputs are theirs.
    """
    pos_L = mask_Bx1xLxS = None
    if decode:
      pos_L, mask_Bx1xLxS = self.decode_positions(inputs_BxL, valid_BxL)
    elif valid_BxL is not None:
      mask_Bx1xLxS = KeyMask(valid_BxL, self_visible=True)
    x_BxLxD = self.drop(self.embed(inputs_BxL), deterministic=deterministic)
    for block in self.blocks:
      x_BxLxD, key_BxLxD = block(x_BxLxD, deterministic, mask_Bx1xLxS, pos_L, decode)
    logits_BxLxV = self.logits(x_BxLxD)
    if return_key:
      return logits_BxLxV, key_BxLxD.astype(jnp.float32)
    return logits_BxLxV


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """Plain decoding with a KV cache (no retrieval); as a kNN-LM when `ctx.knn` is set."""
  if ctx.knn is not None:
    from models import knnlm

    return knnlm.sample(ctx)
  B, T = ctx.tokens_BxT.shape
  step = ctx.decoder()
  cache = ctx.cache(B, T)
  for pos in ctx.positions("generate"):
    logits_Bx1xV, cache = step(ctx.params, cache, jnp.asarray(ctx.tokens_BxT[:, pos:pos + 1]))
    ctx.draw(pos, jax.nn.log_softmax(logits_Bx1xV[:, 0]))
  return lambda b, first, last: []


FAMILY = Family(name="transformer", model=Transformer, loss=models.lm_loss, sample=sample,
                inputs=lambda spec, batch: (batch["inputs"],), knn_key=True)
