"""Attention kernels behind `model.attention`: one call, an implementation per platform.

    out_BxTxHxK = attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask, causal, "auto")

`q` already carries the 1/sqrt(K) scale and the rotary embeddings (applied before any
kernel). Implementations:
- `cpu_blocked`: `attend`, a blocked einsum softmax tuned for XLA:CPU (plain XLA ops, so it
  runs anywhere); decoding with a cache always uses it.
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention
  (NVIDIA GPUs; bfloat16/float16 compute, head dim <= 128 and a multiple of 8).
- `splash`: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
  a TPU kernel; on other platforms it runs in Pallas interpret mode (tests only: slow).
  Lengths are padded to multiples of 128 (RETRO's 64-token chunk queries run as 128).
  Under a mesh set with `jax.sharding.use_abstract_mesh` (the train step sets one) it runs
  per shard of the batch (`shard_map` over every mesh axis).
- `auto`: cudnn on GPU, splash on TPU, cpu_blocked elsewhere.
A call that an implementation cannot take (cudnn: float32 or an unsupported head dim;
splash: a dense mask, or several devices and no mesh, as in evaluation) runs on `xla`.

Masks: None, a `KeyMask` (which keys are valid; with `self_visible`, self-attention where
every query also sees itself) or a dense boolean [B, 1, T, S] (decoding). True = attend.
A query that sees no key (RETRO: a chunk without neighbours, whose update the model then
zeroes) gets a finite output: the mean of the values (cpu_blocked, xla), or another finite
value (splash averages over its padded length, cuDNN's smaller mask bias leaves the plain
softmax).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "cpu_blocked")
# The logit bias of masked keys (`jax.nn.dot_product_attention` and splash use the same
# value): finite, so a fully masked row stays uniform (never NaN); next to any unmasked
# key the masked ones get probability, and gradient, exactly 0.
_MASKED = np.float32(-0.7 * np.finfo(np.float32).max)
# Query block of cpu_blocked causal attention: block i attends to keys [0, (i+1)*block)
# only, skipping the fully masked blocks above the diagonal (at L=512 the work falls to 5/8).
CAUSAL_BLOCK = 128
_LANES = 128  # splash pads lengths to multiples of this (its tiles are multiples of it)


@struct.dataclass
class KeyMask:
  """Which keys each query sees: the valid ones (`valid_BxS`, True = attend) and, with
  `self_visible` (self-attention, T == S), its own position too, so no row is empty. The
  outputs at padded positions are never read (padded keys are masked): splash lets a
  padded query see only itself, the other kernels also the valid keys."""
  valid_BxS: jax.Array
  self_visible: bool = struct.field(pytree_node=False, default=False)

  def dense(self) -> jax.Array:
    """The mask as a boolean [B, 1, T or 1, S]."""
    keep_Bx1x1xS = self.valid_BxS[:, None, None, :]
    if not self.self_visible:
      return keep_Bx1x1xS
    S = self.valid_BxS.shape[1]
    return keep_Bx1x1xS | jnp.eye(S, dtype=bool)[None, None]


Mask = KeyMask | jax.Array | None


def resolve(implementation: str) -> str:
  """`auto` -> the implementation of the default backend's platform; others unchanged."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(jax.default_backend(),
                                                                 "cpu_blocked")


def attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
              mask: Mask = None, causal: bool = False, implementation: str = "auto"
              ) -> jax.Array:
  """softmax(q k^T + masks) v per head, [B, T, H, K], by `implementation` (see above)."""
  impl = resolve(implementation)
  T, S = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
  if impl == "cudnn" and not _cudnn_takes(q_BxTxHxK, T, S):
    impl = "xla"
  if impl == "splash" and not _splash_takes(mask, T, S):
    impl = "xla"
  dense_Bx1xTxS = mask.dense() if isinstance(mask, KeyMask) else mask
  if impl == "cpu_blocked":
    heads_first = lambda a: jnp.transpose(a, (0, 2, 1, 3))
    out_BxHxTxK = attend(heads_first(q_BxTxHxK), heads_first(k_BxSxHxK),
                         heads_first(v_BxSxHxK), dense_Bx1xTxS, causal)
    return heads_first(out_BxHxTxK)
  if impl == "splash":
    return _splash(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask, causal)
  if impl == "cudnn" and dense_Bx1xTxS is not None:  # cuDNN takes the mask as a full bias
    dense_Bx1xTxS = jnp.broadcast_to(dense_Bx1xTxS, (q_BxTxHxK.shape[0], 1, T, S))
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=dense_Bx1xTxS,
                                      scale=1.0, is_causal=causal, implementation=impl)


@jax.custom_jvp
def _softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis; its derivative is written out (y * (t - <y, t>)), which
  XLA's CPU backend runs about 10% faster in attention than `jax.nn.softmax`'s."""
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


@_softmax.defjvp
def _softmax_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
  (x,), (t,) = primals, tangents
  y = _softmax(x)
  return y, y * (t - jnp.sum(y * t, axis=-1, keepdims=True))


def _rows(mask_Bx1xTxS: jax.Array, t0: int, t1: int, s1: int) -> jax.Array:
  """Rows t0:t1 (unless broadcast) and the first s1 keys (unless broadcast) of a mask."""
  rows = slice(t0, t1) if mask_Bx1xTxS.shape[2] > 1 else slice(None)
  keys = slice(0, s1) if mask_Bx1xTxS.shape[3] > 1 else slice(None)
  return mask_Bx1xTxS[:, :, rows, keys]


def attend(q_BxHxTxK: jax.Array, k_BxHxSxK: jax.Array, v_BxHxSxK: jax.Array,
           mask_Bx1xTxS: jax.Array | None = None, causal: bool = False) -> jax.Array:
  """cpu_blocked: softmax(q k^T + masks) v per head, heads first.

  Logits and softmax are float32 (as in `jax.nn.dot_product_attention`); `causal`
  (self-attention, T == S) runs in query blocks of `CAUSAL_BLOCK` that skip the keys after
  the block, which are masked anyway. `mask_Bx1xTxS` (True = attend) broadcasts.
  """
  T, S = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
  step = CAUSAL_BLOCK if causal else T
  outs = []
  for t0 in range(0, T, step):
    t1 = min(t0 + step, T)
    s1 = t1 if causal else S
    logits_BxHxQxS = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxTxK[:, :, t0:t1], k_BxHxSxK[:, :, :s1],
                                preferred_element_type=jnp.float32)
    keep = None if mask_Bx1xTxS is None else _rows(mask_Bx1xTxS, t0, t1, s1)
    if causal:
      tri_QxS = np.arange(s1)[None, :] <= np.arange(t0, t1)[:, None]
      keep = tri_QxS if keep is None else keep & tri_QxS
    if keep is not None:
      # An additive bias of the mask's (broadcast) shape: a select against the full
      # logits costs XLA's CPU backend twice the time of the whole masked softmax.
      logits_BxHxQxS = logits_BxHxQxS + jnp.where(keep, np.float32(0), _MASKED)
    probs_BxHxQxS = _softmax(logits_BxHxQxS).astype(v_BxHxSxK.dtype)
    outs.append(jnp.einsum("bhqs,bhsk->bhqk", probs_BxHxQxS, v_BxHxSxK[:, :, :s1]))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _cudnn_takes(q_BxTxHxK: jax.Array, T: int, S: int) -> bool:
  """cuDNN flash attention's limits (jax.nn.dot_product_attention raises beyond them)."""
  K = q_BxTxHxK.shape[-1]
  return (q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16) and K <= 128 and K % 8 == 0
          and T % 2 == 0 and S % 2 == 0)


def _splash_tile(n: int) -> int:
  """The splash tile of a length (a multiple of 128): the largest of 512, 256, 128 dividing it."""
  return next(t for t in (512, 256, _LANES) if n % t == 0)


def _splash_takes(mask: Mask, T: int, S: int) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return (not isinstance(mask, jax.Array) and (jax.device_count() == 1 or not mesh.empty)
          and not (isinstance(mask, KeyMask) and mask.self_visible and T != S))


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, T: int, S: int, causal: bool, interpret: bool) -> Any:
  """A splash kernel for [H, T, K] x [H, S, K] (masks are processed once, on the host)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  bq, bkv = _splash_tile(T), _splash_tile(S)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  full = splash.CausalMask((T, S)) if causal else splash.FullMask((T, S))
  with jax.ensure_compile_time_eval():  # concrete mask arrays: the kernel outlives a trace
    return splash.make_splash_mha(splash.MultiHeadMask([full] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
            mask: KeyMask | None, causal: bool) -> jax.Array:
  """Splash attention, vmapped over the batch, lengths padded to multiples of 128 (the
  kernel's tiles). Key masks become segment ids (a query sees the keys of its segment):
  valid keys are segment 0; in self-attention each padded token is a segment of its own
  (it sees itself), in cross-attention padding is segment 1; keys added by the length
  padding are segment -1 (no query sees them), added queries are segment 0 (dropped)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  (B, T, H, _), S = q_BxTxHxK.shape, k_BxSxHxK.shape[1]
  Tp, Sp = -(-T // _LANES) * _LANES, -(-S // _LANES) * _LANES
  kernel = _splash_kernel(H, Tp, Sp, causal, jax.default_backend() != "tpu")
  segments = None
  if mask is not None or (Tp, Sp) != (T, S):
    valid_BxS = jnp.ones((B, S), bool) if mask is None else mask.valid_BxS
    if mask is not None and mask.self_visible:
      q_BxT = kv_BxS = jnp.where(valid_BxS, 0, 1 + jnp.arange(S, dtype=jnp.int32))
    else:
      q_BxT, kv_BxS = jnp.zeros((B, T), jnp.int32), jnp.where(valid_BxS, 0, 1)
    segments = SegmentIds(q=jnp.pad(q_BxT, ((0, 0), (0, Tp - T))).astype(jnp.int32),
                          kv=jnp.pad(kv_BxS, ((0, 0), (0, Sp - S)),
                                     constant_values=-1).astype(jnp.int32))
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))  # noqa: E731

  def run(q, k, v, seg):
    heads_first = lambda a: jnp.transpose(a, (0, 2, 1, 3))
    per_example = lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg)  # noqa: E731
    out_BxHxTxK = jax.vmap(per_example, in_axes=(0, 0, 0, None if seg is None else 0))(
        heads_first(pad(q, Tp)), heads_first(pad(k, Sp)), heads_first(pad(v, Sp)), seg)
    return heads_first(out_BxHxTxK)[:, :T]

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segments)
  batch = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(run, mesh=mesh, in_specs=batch, out_specs=batch, check_vma=False)(
      q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segments)
