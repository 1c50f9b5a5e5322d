"""The decoder-only LM: the baseline, the kNN-LM base, and the trunk of RETRO and REALM.

Input embedding and output projection are untied (RETRO-pytorch and the paper's
baselines do the same; it also keeps the kNN key free of the output embedding).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import DecoderBlock, RMSNorm, Spec, dense_init, embed_init


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
    self.lm_head = nn.Dense(s.vocab_size, use_bias=False, dtype=s.dtype,
                            kernel_init=dense_init(("embed", "vocab")))
    self.drop = nn.Dropout(s.dropout)

  def has_cca(self, layer: int) -> bool:
    """Whether 0-based decoder layer `layer` holds chunked cross-attention (RETRO only)."""
    return False

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection; float32 logits whatever the compute dtype."""
    return self.lm_head(self.final_norm(x_BxLxD)).astype(jnp.float32)

  def __call__(self, inputs_BxL: jax.Array, deterministic: bool = True,
               return_key: bool = False, valid_BxL: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, L, V]; with `return_key` also the kNN-LM key [B, L, D] (float32).

    The key is the normalised input to the last block's feed-forward layer (Khandelwal
    et al. 2020). `valid_BxL` (optional) masks invalid tokens as attention keys (REALM's
    padded document prefix); every token still attends to itself.
    """
    mask_Bx1xLxL = None
    if valid_BxL is not None:
      eye_LxL = jnp.eye(inputs_BxL.shape[1], dtype=bool)
      mask_Bx1xLxL = valid_BxL[:, None, None, :] | eye_LxL[None, None]
    x_BxLxD = self.drop(self.embed(inputs_BxL), deterministic=deterministic)
    for block in self.blocks:
      x_BxLxD, key_BxLxD = block(x_BxLxD, deterministic, mask_Bx1xLxL)
    logits_BxLxV = self.logits(x_BxLxD)
    if return_key:
      return logits_BxLxV, key_BxLxD.astype(jnp.float32)
    return logits_BxLxV
