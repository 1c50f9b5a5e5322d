"""Numerical building blocks: dense kernels, RMSNorm, rotary embeddings, attention, MLP.

Parameters are float32 and carry logical axis names ("embed", "mlp", "heads", "kv",
"vocab") through `nn.with_logical_partitioning`, so training code can map them onto a
mesh; computation runs in the module's `dtype` (bfloat16 on request).

Written for XLA's CPU backend (bench/train_throughput.py measures it): every dense layer
is one 2-D matmul, self-attention projects q, k and v with one matmul, and rotary tables
are constants. The attention kernel itself is `models.attention` (`model.attention`
chooses it: cuDNN, splash, XLA, or the blocked CPU one). The parameters keep flax's
`Dense`/`DenseGeneral` names, shapes and init.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.attention import KeyMask, Mask, attend, attention

# Token positions for rotary embeddings: static and hashable (remat specialises on them).
Positions = tuple[int, ...]


def dense_init(names: tuple[str | None, ...]) -> Callable:
  """LeCun-normal kernel init boxed with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


def embed_init(names: tuple[str | None, ...] = ("vocab", "embed")) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), names)


class Kernel(nn.Module):
  """A bias-free dense kernel of shape [*in_shape, *features], returned as a 2-D view.

  Initialised like flax's `DenseGeneral` (LeCun normal over the flattened [in, out]
  matrix, then reshaped), under the parameter name `kernel`, so it stands in for
  `nn.Dense`/`nn.DenseGeneral` with the same parameter tree. The caller multiplies with
  `dense`: XLA's CPU backend is fastest on plain 2-D matmuls, and a dot with several
  contracting dimensions (a [B, L, D] input, a [H, K, D] kernel) makes its weight
  gradient about twice as slow. `zero=True` initialises it at zero instead.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  zero: bool = False

  @nn.compact
  def __call__(self, in_shape: tuple[int, ...]) -> jax.Array:
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(self.features))
    flat_init = (nn.with_logical_partitioning(nn.initializers.zeros, self.names) if self.zero
                 else dense_init(self.names))

    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any) -> Any:
      flat = flat_init(rng, (n_in, n_out), dtype)
      return nn.meta.replace_boxed(flat, jnp.reshape(flat.unbox(), shape))

    kernel = self.param("kernel", init, (*in_shape, *self.features), jnp.float32)
    return kernel.reshape(n_in, n_out)


def dense(x: jax.Array, kernel_IxO: jax.Array, dtype: Any, in_dims: int = 1) -> jax.Array:
  """`x` with its last `in_dims` axes contracted against a 2-D kernel, as one [N, I] x [I, O]
  matmul in `dtype`; returns [*leading axes of x, O]."""
  lead = x.shape[:x.ndim - in_dims]
  x_NxI = x.reshape(-1, kernel_IxO.shape[0]).astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    y_NxO = jnp.dot(x_NxI, kernel_IxO.astype(dtype))
  else:
    y_NxO = _low_precision_matmul(x_NxI, kernel_IxO.astype(dtype))
  return y_NxO.reshape(*lead, kernel_IxO.shape[1])


def _dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b accumulated (and returned) in float32, cast to a's dtype."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _low_precision_matmul(x_NxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """x @ w for bfloat16/float16 operands with float32 accumulation, forward and backward.

  XLA's CPU backend runs bf16 x bf16 -> f32 dots on the AVX512-BF16 instructions (about
  twice the float32 rate) but bf16 x bf16 -> bf16 ones at the float32 rate; autodiff of
  the forward dot would also mix a float32 cotangent into the backward dots. (The weight
  gradient, contracting the leading axis of both operands, still runs in float32.)
  """
  return _dot_f32(x_NxI, w_IxO)


def _low_precision_matmul_fwd(x_NxI: jax.Array, w_IxO: jax.Array):
  return _dot_f32(x_NxI, w_IxO), (x_NxI, w_IxO)


def _low_precision_matmul_bwd(residuals, dy_NxO: jax.Array):
  x_NxI, w_IxO = residuals
  dy_NxO = dy_NxO.astype(x_NxI.dtype)
  return _dot_f32(dy_NxO, w_IxO.T), _dot_f32(x_NxI.T, dy_NxO)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


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


def rope(x_BxTxHxD: jax.Array, pos_T: Positions | jax.Array, base: float, scale: float = 1.0
         ) -> jax.Array:
  """Rotary position embedding (rotate-half form) at integer positions `pos_T`, times
  `scale` (in float32, before casting back).

  Static positions (a tuple) make the sin/cos tables compile-time constants: XLA would
  otherwise recompute sin and cos per element inside each fused rope. Decoding passes
  traced positions (an array), whose tables are computed in the graph.
  """
  half = x_BxTxHxD.shape[-1] // 2
  inv_freq = base ** (-np.arange(half, dtype=np.float32) / half)
  if isinstance(pos_T, tuple):
    angle_TxF = np.asarray(pos_T, np.float32)[:, None] * inv_freq[None, :]
    sin_Tx1xF = (scale * np.sin(angle_TxF))[:, None, :].astype(np.float32)
    cos_Tx1xF = (scale * np.cos(angle_TxF))[:, None, :].astype(np.float32)
  else:
    angle_TxF = pos_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    sin_Tx1xF = (scale * jnp.sin(angle_TxF))[:, None, :]
    cos_Tx1xF = (scale * jnp.cos(angle_TxF))[:, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_Tx1xF - x2 * sin_Tx1xF, x2 * cos_Tx1xF + x1 * sin_Tx1xF], -1)
  return out.astype(x_BxTxHxD.dtype)


class Attention(nn.Module):
  """Multi-head attention with rotary positions.

  Queries come from `x`, keys and values from `kv`, or from `x` too with `kv=None`
  (self-attention: then one matmul projects q, k and v); `causal` adds the causal mask,
  `mask` any other (a `models.attention.KeyMask`, or a dense [B, 1, T, S], True = attend).
  `implementation` is the kernel (`models.attention`). Parameters: `query`, `key`, `value`
  ([D, H, K] kernels) and `out` ([H, K, D]), as with flax's `DenseGeneral`.

  `decode=True` (self-attention only) keeps the rotated keys and the values of every
  position in the "cache" collection: `init` with decode sizes the cache by its input
  length S; each later call writes its T new keys and values at positions `pos_S` (an
  array) and attends over all S cached positions, so a dense `mask` must say which of
  them each query sees. `zero_out=True` initialises `out` at zero: the layer starts as a
  no-op on the residual stream (RETRO's CCA, `model.cca_zero_init`).

  `key_smear=R` (cross-attention over groups of R tokens, RETRO's neighbours) smears the
  keys: key j becomes (1-g) k_j + g k_{j-1} within its group, with a learned gate g per head
  (parameter `smear`, g = sigmoid(0) = 0.5 at initialisation). A key then carries the token
  before it, so a query can find "the token that followed my current token" in a neighbour
  at any offset, as an induction head does ("smeared keys"; Olsson et al. 2022).

  `null_kv=True` (cross-attention) adds a learned null key and value per head (parameters
  `null_key`, `null_value`, both zero at initialisation) that every query also sees, so a
  query can attend to nothing when no key matches: RETRO's CCA can then ignore neighbours
  that do not continue the text. The null logit is the unrotated query times the null key,
  the same at every position; it rides on every kernel as one extra feature of q and k.
  """
  num_heads: int
  head_dim: int
  out_dim: int
  rope_base: float
  causal: bool = False
  dtype: Any = jnp.float32
  implementation: str = "auto"
  zero_out: bool = False
  key_smear: int = 0
  null_kv: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, kv_BxSxE: jax.Array | None,
               pos_T: Positions | jax.Array, pos_S: Positions | jax.Array,
               mask: Mask = None, decode: bool = False) -> jax.Array:
    H, K = self.num_heads, self.head_dim
    self_attention = kv_BxSxE is None
    kv_BxSxE = x_BxTxD if self_attention else kv_BxSxE
    (B, T, D), S = x_BxTxD.shape, kv_BxSxE.shape[1]
    proj = lambda name, width: Kernel((H, K), ("embed", "heads", "kv"), name=name)((width,))
    wq_DxHK = proj("query", D)
    wk_ExHK, wv_ExHK = proj("key", kv_BxSxE.shape[-1]), proj("value", kv_BxSxE.shape[-1])
    if self_attention:
      qkv_BxTx3xHxK = dense(x_BxTxD, jnp.concatenate([wq_DxHK, wk_ExHK, wv_ExHK], 1),
                            self.dtype).reshape(B, T, 3, H, K)
      q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
    else:
      q_BxTxHxK = dense(x_BxTxD, wq_DxHK, self.dtype).reshape(B, T, H, K)
      kv_BxSx2xHxK = dense(kv_BxSxE, jnp.concatenate([wk_ExHK, wv_ExHK], 1),
                           self.dtype).reshape(B, S, 2, H, K)
      k_BxSxHxK, v_BxSxHxK = kv_BxSx2xHxK[:, :, 0], kv_BxSx2xHxK[:, :, 1]
    if self.key_smear:
      k_BxSxHxK = self._smear(k_BxSxHxK)
    q_rot_BxTxHxK = rope(q_BxTxHxK, pos_T, self.rope_base, K ** -0.5)
    k_BxSxHxK = rope(k_BxSxHxK, pos_S, self.rope_base)
    if self.null_kv:  # (then S and K grow by the null key and its features: sliced below)
      q_rot_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask = self._with_null(
          q_BxTxHxK, q_rot_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask)
    if decode:
      out_BxTxHxK = self._decode(q_rot_BxTxHxK, k_BxSxHxK, v_BxSxHxK, pos_S, mask)
    else:
      out_BxTxHxK = attention(q_rot_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask, self.causal,
                              self.implementation)
    out_BxTxHxK = out_BxTxHxK[..., :K]
    wo_HKxD = Kernel((self.out_dim,), ("heads", "kv", "embed"), zero=self.zero_out,
                     name="out")((H, K))
    return dense(out_BxTxHxK, wo_HKxD, self.dtype, in_dims=2)

  def _smear(self, k_BxSxHxK: jax.Array) -> jax.Array:
    """Mixes each key with the previous one of its group of `key_smear` (see above)."""
    S = k_BxSxHxK.shape[1]
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
    gate_H = jax.nn.sigmoid(self.param("smear", init, (self.num_heads,), jnp.float32))
    prev_BxSxHxK = jnp.pad(k_BxSxHxK[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    first_S = np.arange(S) % self.key_smear == 0  # a group's first key has no predecessor
    prev_BxSxHxK = jnp.where(first_S[None, :, None, None], k_BxSxHxK, prev_BxSxHxK)
    gate_H = gate_H.astype(k_BxSxHxK.dtype)
    return k_BxSxHxK + gate_H[:, None] * (prev_BxSxHxK - k_BxSxHxK)

  def _with_null(self, q_BxTxHxK: jax.Array, q_rot_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array,
                 v_BxSxHxK: jax.Array, mask: Mask
                 ) -> tuple[jax.Array, jax.Array, jax.Array, Mask]:
    """q, k, v and mask with the null key appended as key S (see above): q gains the null
    logit as feature K, the null key is the unit vector of that feature, the real keys and
    the values gain zero features (the caller drops them from the output). Features are
    padded to a multiple of 8 (K+P), as fused GPU kernels need."""
    B, T, H, K = q_BxTxHxK.shape
    P = -(-(K + 1) // 8) * 8 - K
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
    key_HxK = self.param("null_key", init, (H, K), jnp.float32)
    value_HxK = self.param("null_value", init, (H, K), jnp.float32)
    dtype = q_rot_BxTxHxK.dtype
    logit_BxTxHx1 = jnp.einsum("bthk,hk->bth", q_BxTxHxK.astype(jnp.float32),
                               key_HxK)[..., None] * K ** -0.5
    features = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, n)))  # noqa: E731
    q_BxTxHxKP = jnp.concatenate([q_rot_BxTxHxK, features(logit_BxTxHx1.astype(dtype),
                                                          P - 1)], -1)
    unit_KP = np.eye(K + P, dtype=np.float32)[K]
    k_Bx1xHxKP = jnp.broadcast_to(jnp.asarray(unit_KP, k_BxSxHxK.dtype), (B, 1, H, K + P))
    k_BxS1xHxKP = jnp.concatenate([features(k_BxSxHxK, P), k_Bx1xHxKP], 1)
    v_Bx1xHxK = jnp.broadcast_to(value_HxK.astype(v_BxSxHxK.dtype), (B, 1, H, K))
    v_BxS1xHxKP = features(jnp.concatenate([v_BxSxHxK, v_Bx1xHxK], 1), P)
    if isinstance(mask, KeyMask):
      mask = KeyMask(jnp.pad(mask.valid_BxS, ((0, 0), (0, 1)), constant_values=True),
                     mask.self_visible)
    elif mask is not None:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=True)
    return q_BxTxHxKP, k_BxS1xHxKP, v_BxS1xHxKP, mask

  def _decode(self, q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
              pos_S: Positions | jax.Array, mask_Bx1xTxS: jax.Array | None) -> jax.Array:
    """Attention over the cached keys and values (heads first), cpu_blocked (plain XLA)."""
    heads_first = lambda a: jnp.transpose(a, (0, 2, 1, 3))
    k_BxHxSxK, v_BxHxSxK = heads_first(k_BxSxHxK), heads_first(v_BxSxHxK)
    keys = self.variable("cache", "cached_key", jnp.zeros, k_BxHxSxK.shape, k_BxHxSxK.dtype)
    values = self.variable("cache", "cached_value", jnp.zeros, v_BxHxSxK.shape,
                           v_BxHxSxK.dtype)
    causal = self.causal
    if not self.is_initializing():
      start = (0, 0, pos_S[0], 0)
      keys.value = jax.lax.dynamic_update_slice(keys.value, k_BxHxSxK, start)
      values.value = jax.lax.dynamic_update_slice(values.value, v_BxHxSxK, start)
      k_BxHxSxK, v_BxHxSxK, causal = keys.value, values.value, False
    return heads_first(attend(heads_first(q_BxTxHxK), k_BxHxSxK, v_BxHxSxK, mask_Bx1xTxS,
                              causal))


class Mlp(nn.Module):
  """Two-layer GELU feed-forward (parameters `wi`, `wo`, as with flax's `Dense`)."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    D = x_BxTxD.shape[-1]
    wi_DxF = Kernel((self.hidden_dim,), ("embed", "mlp"), name="wi")((D,))
    wo_FxD = Kernel((D,), ("mlp", "embed"), name="wo")((self.hidden_dim,))
    return dense(nn.gelu(dense(x_BxTxD, wi_DxF, self.dtype)), wo_FxD, self.dtype)
