"""RETRO (Borgeaud et al. 2021): a decoder LM with chunked cross-attention (CCA).

A sequence of length L is split into C = ceil(L/m) chunks of m tokens; chunk c has K
retrieved neighbours of R tokens (chunk + continuation). A bidirectional encoder of its
own width embeds each neighbour and cross-attends to the decoder states of chunk c,
taken after the self-attention of the first CCA layer (computed once, reused by every CCA
layer). CCA follows the paper: the hidden states are shifted left by m-1, so attending
chunk c covers positions (c+1)m-1 .. (c+1)m+m-2 and attends to the K*R encoded tokens
of chunk c's neighbours; the first m-1 positions get no CCA, and of the last chunk's
window only position L-1 lies inside the sequence (the rest is dropped). Hence the
neighbours of chunk c influence only positions >= (c+1)m-1. Everything is batched over
chunks ([B*C, m, D] queries against [B*C, K*R, E] keys): no Python loop over chunks.

Decoding (`decode=True`, one token per call, see `models.init_cache`) caches the
self-attention keys and values of every layer, the current chunk's states at the first CCA
layer, and the encoded neighbours of the last completed chunk. The neighbours of chunk c
arrive with the token that completes it (position (c+1)m-1): they are encoded against the
cached states of chunk c, and that token and the next m-1 attend to them. No earlier state
changes when they arrive, so the cached logits equal the full forward's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import models
from common.errors import UserError
from models.attention import KeyMask
from models.family import EvalVariant, Family, RetrievalSpec, token_batch
from models.layers import DecoderBlock, Encoder, Spec
from models.transformer import Transformer


class Retro(Transformer):
  """RETRO decoder. `apply(vars, inputs_BxL, neighbours_BxCxKxR=None, deterministic=True)`.

  With `neighbours=None` this is exactly `Transformer` on the same parameters (CCA and
  the encoder are skipped). Neighbour token id 0 is padding and is masked; a chunk whose
  neighbours are all padding gets no CCA update. L need not be a multiple of m: the
  input is padded internally and the logits sliced back. `neighbours` may hold
  ceil(L/m) chunks or floor(L/m) (an incomplete last chunk has no neighbours yet).
  """

  def setup(self):
    super().setup()
    s = self.spec
    self.encoder = Encoder(s.encoder, s.rope_base, s.dropout, s.dtype, s.remat, cross=True)

  def has_cca(self, layer: int) -> bool:
    return layer + 1 in self.spec.cca_layers

  def _check_neighbours(self, nbr: jax.Array, batch: int, length: int) -> jax.Array:
    """Validates the neighbour shape and pads a missing last chunk with padding tokens."""
    m = self.spec.chunk_size
    chunks = -(-length // m)
    if nbr.ndim != 4 or nbr.shape[0] != batch or nbr.shape[1] not in (chunks, length // m):
      raise UserError(f"RETRO neighbours have shape {tuple(nbr.shape)}; expected [B={batch}, "
                      f"C={chunks}, K, R] for inputs of length {length} and chunk size {m} "
                      "(check retrieval.num_neighbours and data.seq_len)")
    return jnp.pad(nbr, ((0, 0), (0, chunks - nbr.shape[1]), (0, 0), (0, 0)))

  def _cca(self, block: DecoderBlock, x_BxLxD: jax.Array, enc_NxKxRxE: jax.Array,
           valid_NxKxR: jax.Array, deterministic: bool) -> jax.Array:
    """The chunked cross-attention update for every position (zeros where none applies)."""
    m = self.spec.chunk_size
    B, L, D = x_BxLxD.shape
    N, K, R, E = enc_NxKxRxE.shape
    # Attending chunk c = positions (c+1)m-1 .. (c+1)m+m-2: shift left by m-1, pad the end.
    h_NxMxD = jnp.pad(x_BxLxD[:, m - 1:], ((0, 0), (0, m - 1), (0, 0))).reshape(N, m, D)
    valid_NxT = valid_NxKxR.reshape(N, K * R)
    upd_NxMxD = block.cross_attention(
        h_NxMxD, enc_NxKxRxE.reshape(N, K * R, E), tuple(range(m - 1, 2 * m - 1)),
        tuple(range(R)) * K, KeyMask(valid_NxT), deterministic)
    upd_NxMxD = upd_NxMxD * valid_NxT.any(-1)[:, None, None].astype(upd_NxMxD.dtype)
    upd_BxLxD = upd_NxMxD.reshape(B, L, D)
    return jnp.pad(upd_BxLxD[:, :L - (m - 1)], ((0, 0), (m - 1, 0), (0, 0)))

  @nn.compact
  def chunk_memory(self, batch: int) -> tuple[nn.Variable, nn.Variable, nn.Variable]:
    """Decoding cache of CCA: the current chunk's states at the first CCA layer [B, m, D],
    and the last completed chunk's encoded neighbours [B, K, R, E] and their validity."""
    s = self.spec
    K, R = s.num_neighbours, s.neighbour_len
    return (self.variable("cache", "chunk_states", jnp.zeros,
                          (batch, s.chunk_size, s.width), s.dtype),
            self.variable("cache", "neighbours", jnp.zeros,
                          (batch, K, R, s.encoder.width), s.dtype),
            self.variable("cache", "neighbour_valid", jnp.zeros, (batch, K, R), bool))

  def _cca_step(self, block: DecoderBlock, x_Bx1xD: jax.Array, enc_BxKxRxE: jax.Array,
                valid_BxKxR: jax.Array, pos: jax.Array) -> jax.Array:
    """The CCA update of the token at position `pos` (the last completed chunk's window)."""
    m = self.spec.chunk_size
    B, K, R, E = enc_BxKxRxE.shape
    valid_BxT = valid_BxKxR.reshape(B, K * R)
    upd_Bx1xD = block.cross_attention(
        x_Bx1xD, enc_BxKxRxE.reshape(B, K * R, E), ((pos - (m - 1)) % m + m - 1)[None],
        tuple(range(R)) * K, valid_BxT[:, None, None, :], deterministic=True)
    live_B = valid_BxT.any(-1) & (pos >= m - 1)
    return upd_Bx1xD * live_B[:, None, None].astype(upd_Bx1xD.dtype)

  def _decode_step(self, inputs_Bx1: jax.Array, neighbours_Bx1xKxR: jax.Array | None
                   ) -> jax.Array:
    """Logits [B, 1, V] of the next token; `neighbours` only with a chunk's last token."""
    s = self.spec
    m = s.chunk_size
    B, T = inputs_Bx1.shape
    if T != 1:
      raise UserError(f"RETRO decodes one token per call, got {T}; feed a prompt token by "
                      "token (its chunks' neighbours arrive with their last tokens)")
    shape = (B, 1, s.num_neighbours, s.neighbour_len)
    if neighbours_Bx1xKxR is not None and neighbours_Bx1xKxR.shape != shape:
      raise UserError(f"decoding RETRO neighbours have shape {neighbours_Bx1xKxR.shape}; "
                      f"expected {shape}: the K neighbours of the chunk this token completes")
    pos_1, mask_Bx1x1xS = self.decode_positions(inputs_Bx1)
    states, encoded, valid = self.chunk_memory(B)
    first_cca = min(s.cca_layers) - 1
    x_Bx1xD = self.embed(inputs_Bx1)
    for i, block in enumerate(self.blocks):
      x_Bx1xD = block.self_attention(x_Bx1xD, True, mask_Bx1x1xS, pos_1, decode=True)
      if i == first_cca:
        states.value = jax.lax.dynamic_update_slice(states.value, x_Bx1xD, (0, pos_1[0] % m, 0))
        if neighbours_Bx1xKxR is not None:
          nbr_BxKxR = neighbours_Bx1xKxR[:, 0]
          valid.value = nbr_BxKxR != 0
          encoded.value = self.encoder(self.embed(nbr_BxKxR), valid.value, states.value, True)
      if self.has_cca(i):
        x_Bx1xD = x_Bx1xD + self._cca_step(block, x_Bx1xD, encoded.value, valid.value, pos_1[0])
      x_Bx1xD, _ = block.feed_forward(x_Bx1xD, True)
    return self.logits(x_Bx1xD)

  def __call__(self, inputs_BxL: jax.Array, neighbours_BxCxKxR: jax.Array | None = None,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
    s = self.spec
    m = s.chunk_size
    B, L = inputs_BxL.shape
    if decode and not self.is_initializing():
      return self._decode_step(inputs_BxL, neighbours_BxCxKxR)
    if neighbours_BxCxKxR is None:
      if not self.is_initializing():
        return super().__call__(inputs_BxL, deterministic)
      # Create the CCA and encoder parameters even when initialised without retrieval.
      neighbours_BxCxKxR = jnp.zeros((B, -(-L // m), s.num_neighbours, s.neighbour_len),
                                     jnp.int32)
    nbr_BxCxKxR = self._check_neighbours(neighbours_BxCxKxR, B, L)
    _, C, K, R = nbr_BxCxKxR.shape
    tokens_BxL = jnp.pad(inputs_BxL, ((0, 0), (0, C * m - L)))
    valid_NxKxR = (nbr_BxCxKxR != 0).reshape(B * C, K, R)
    pos_L = mask_Bx1xLxS = None
    if decode:  # initialising the decoding cache: this input's length sizes it
      pos_L, mask_Bx1xLxS = self.decode_positions(tokens_BxL)
      self.chunk_memory(B)
    x_BxLxD = self.drop(self.embed(tokens_BxL), deterministic=deterministic)
    enc_NxKxRxE = None
    for i, block in enumerate(self.blocks):
      x_BxLxD = block.self_attention(x_BxLxD, deterministic, mask_Bx1xLxS, pos_L, decode)
      if self.has_cca(i):
        if enc_NxKxRxE is None:
          nbr_NxKxRxD = self.embed(nbr_BxCxKxR).reshape(B * C, K, R, s.width)
          chunks_NxMxD = x_BxLxD.reshape(B * C, m, s.width)
          enc_NxKxRxE = self.encoder(nbr_NxKxRxD, valid_NxKxR, chunks_NxMxD, deterministic)
        x_BxLxD = x_BxLxD + self._cca(block, x_BxLxD, enc_NxKxRxE, valid_NxKxR, deterministic)
      x_BxLxD, _ = block.feed_forward(x_BxLxD, deterministic)
    return self.logits(x_BxLxD)[:, :L]


def retrieval(spec: Spec) -> RetrievalSpec:
  """K neighbours of R tokens (chunk + continuation) for every chunk, queried by the chunk."""
  m = spec.chunk_size
  return RetrievalSpec(kind="neighbours", k=spec.num_neighbours, length=spec.neighbour_len,
                       batch_keys=("neighbours",), stride=m, query_len=m)


def example_batch(spec: Spec, batch_size: int, seq_len: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  batch = token_batch(spec, batch_size, seq_len, rng)
  shape = (batch_size, seq_len // spec.chunk_size, spec.num_neighbours, spec.neighbour_len)
  batch["neighbours"] = rng.integers(1, spec.vocab_size, size=shape, dtype=np.int32)
  return batch


def decode_init_args(spec: Spec, batch_size: int, length: int) -> tuple:
  chunks = -(-length // spec.chunk_size)
  return (jnp.zeros((batch_size, length), jnp.int32),
          jnp.zeros((batch_size, chunks, spec.num_neighbours, spec.neighbour_len), jnp.int32))


def validate(config: Any) -> None:
  m = config.model
  layers = tuple(m.cca_layers)
  if not layers or any(not 1 <= i <= m.num_layers for i in layers):
    raise UserError(f"model.cca_layers={layers} must be a non-empty subset of the 1-based "
                    f"decoder layers 1..{m.num_layers}")
  if m.neighbour_len < m.chunk_size:
    raise UserError(f"model.neighbour_len={m.neighbour_len} is shorter than a chunk "
                    f"(model.chunk_size={m.chunk_size}); the paper uses 2 * chunk_size")


def sample(ctx: Any) -> Callable[[int, int, int], list]:
  """RETRO decoding: after every completed chunk (prompt or generated) its text queries the
  datastore and the K neighbours condition the next m positions, as in the paper. Tokens
  of chunk j were predicted from positions jm-1 .. (j+1)m-2, i.e. from chunk j-1's
  neighbours: those are its citations."""
  s = ctx.spec
  m, K, R = s.chunk_size, ctx.k, s.neighbour_len
  tokens_BxT = ctx.tokens_BxT
  B, T = tokens_BxT.shape
  step = ctx.decoder()
  cache = ctx.cache(B, T)
  store = ctx.store
  retrieved: dict[int, dict[int, list]] = {b: {} for b in range(B)}
  for pos in ctx.positions("generate (RETRO)"):
    nbr_Bx1xKxR = None
    if store is not None and pos % m == m - 1:  # chunk pos // m is complete: retrieve
      query_BxM = tokens_BxT[:, pos + 1 - m:pos + 1]
      ids_BxK, dists_BxK = store.search(query_BxM, K)
      windows_BxKxR = store.windows(ids_BxK, R, query_BxM)
      nbr_Bx1xKxR = jnp.asarray(windows_BxKxR[:, None])
      for b in range(B):
        retrieved[b][pos // m] = [store.neighbour(i, d, w) for i, d, w in
                                  zip(ids_BxK[b], dists_BxK[b], windows_BxKxR[b]) if i >= 0]
    logits_Bx1xV, cache = step(ctx.params, cache, jnp.asarray(tokens_BxT[:, pos:pos + 1]),
                               nbr_Bx1xKxR)
    ctx.draw(pos, jax.nn.log_softmax(logits_Bx1xV[:, 0]))
  return lambda b, first, last: retrieved[b].get(first // m - 1, [])


FAMILY = Family(
    name="retro", model=Retro, loss=models.lm_loss, sample=sample,
    inputs=lambda spec, batch: (batch["inputs"], batch.get("neighbours")),
    retrieval=retrieval, example_batch=example_batch, decode_init_args=decode_init_args,
    validate=validate,
    eval_variants=(EvalVariant("retrieval on"), EvalVariant("retrieval off", ("neighbours",), "no_retrieval")))
