"""Model FLOPs per token and model FLOPs utilisation (MFU).

    f = model_flops(config.model, config.data.seq_len)     # forward FLOPs per token, by part
    peak, source = peak_flops_per_s(jax.devices()[0], config.model.dtype)
    mfu = tokens_per_s * f.train / (peak * jax.device_count())

Model FLOPs count the matmuls the model needs, 2 per multiply-add, per decoder token:
decoder projections and MLPs, causal self-attention (query t attends to t+1 keys), the
output projection and, for a model with chunked cross-attention (RETRO: layers where
`has_cca`), the CCA layers (queries at all C*m positions, keys and values from the K*R
encoded neighbour tokens of each chunk) and the neighbour encoder over the C*K*R neighbour
tokens (input projection, self-attention within each neighbour, cross-attention to the
chunk's m decoder states, MLP). Training is 3x the forward pass; remat's recomputation,
padding and masked-out work are not model FLOPs. Families without CCA count their decoder
over the L input tokens only: for REALM (K+1 reader passes over document and input) and
In-Context RALM (the prefix re-read every block) that is a lower bound.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

import models
from models.layers import Spec

# Dense (no sparsity) peak FLOP/s per chip from the vendors' data sheets: (device kind
# pattern, bfloat16, float32). float32 is the rate of XLA's default matmul precision: TF32
# tensor cores on A100 and later GPUs, one bfloat16 pass on TPUs. T4 has no bfloat16 tensor
# cores: its float16 peak is listed. First match wins (H100 PCIe before H100).
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    (r"h100 pcie", 756e12, 378e12),
    (r"h100", 989e12, 495e12),
    (r"h200", 989e12, 495e12),
    (r"a100", 312e12, 156e12),
    (r"\bl4\b", 121e12, 60e12),
    (r"\bt4\b", 65e12, 8.1e12),
    (r"tpu v4", 275e12, 275e12),
    (r"tpu v5 ?(lite|e)\b", 197e12, 197e12),
    (r"tpu v5p?\b", 459e12, 459e12),
    (r"tpu v6 ?(lite|e)\b", 918e12, 918e12),
)
_LOW_PRECISION = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs per decoder token, by part (see the module docstring)."""
  decoder: float
  attention: float
  cca: float
  encoder: float
  head: float

  @property
  def forward(self) -> float:
    return self.decoder + self.attention + self.cca + self.encoder + self.head

  @property
  def train(self) -> float:
    """Forward and backward (the backward pass costs twice the forward)."""
    return 3.0 * self.forward


def cca_layers(model_config: Any) -> list[int]:
  """The 0-based decoder layers that hold chunked cross-attention (the model's `has_cca`)."""
  model = models.get_model(model_config)
  if not hasattr(model, "has_cca"):
    return []
  layers = range(Spec.from_config(model_config).num_layers)
  return [i for i in layers if model.apply({}, i, method=lambda m, i: m.has_cca(i))]


def model_flops(model_config: Any, seq_len: int) -> Flops:
  """Forward model FLOPs per token of sequences of `seq_len` tokens."""
  s = Spec.from_config(model_config)
  L, D, F, V = seq_len, s.width, s.mlp_dim, s.vocab_size
  HK = s.num_heads * s.head_dim
  decoder = s.num_layers * L * 2 * (4 * D * HK + 2 * D * F)
  attention = s.num_layers * 2 * 2 * HK * L * (L + 1) / 2
  head = L * 2 * D * V
  cca = encoder = 0.0
  n_cca = len(cca_layers(model_config))
  if n_cca:
    e, m, K, R = s.encoder, s.chunk_size, s.num_neighbours, s.neighbour_len
    E, EHK = e.width, e.num_heads * e.head_dim
    C = -(-L // m)
    nbr = C * K * R  # neighbour tokens of a sequence
    cca = n_cca * (C * m * 2 * 2 * D * HK + nbr * 2 * 2 * E * HK + 2 * 2 * HK * C * m * K * R)
    per_layer = (nbr * 2 * 4 * E * EHK + 2 * 2 * EHK * nbr * R  # self-attention
                 + nbr * 2 * 2 * E * EHK + C * m * 2 * 2 * D * EHK + 2 * 2 * EHK * nbr * m
                 + nbr * 2 * 2 * E * e.mlp_dim)
    encoder = nbr * 2 * D * E + e.num_layers * per_layer
  return Flops(decoder / L, attention / L, cca / L, encoder / L, head / L)


def table_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of this kind for `dtype` compute, or None if not listed."""
  kind = device_kind.lower()
  for pattern, bf16, fp32 in PEAK_FLOPS:
    if re.search(pattern, kind):
      return bf16 if dtype in _LOW_PRECISION else fp32
  return None


def measured_cpu_peak(size: int = 2048, repeats: int = 2) -> float:
  """FLOP/s of the fastest of `repeats` jitted float32 [size, size] matmuls (after one
  warm-up): this CPU's practical peak, measured in the same run."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops_per_s(device: jax.Device, dtype: str, cpu_matmul: int = 2048
                     ) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where it comes from): the table for accelerators, a
  measured float32 matmul of `cpu_matmul` squared for CPUs, (None, ...) if unknown."""
  if device.platform == "cpu":
    return measured_cpu_peak(cpu_matmul), f"measured: jitted float32 {cpu_matmul}^2 matmul"
  peak = table_peak(device.device_kind, dtype)
  return peak, (f"table: {device.device_kind}, {dtype}" if peak else
                f"unknown device kind {device.device_kind!r}: add it to training.flops.PEAK_FLOPS")


def _si(x: float) -> str:
  """1234567 -> '1.235 M'."""
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.4g} {unit}"
  return f"{x:.4g} "


def summary(params: Any, flops: Flops, peak: float | None, source: str) -> str:
  """One line: parameter counts, model FLOPs per token, the peak MFU is measured against."""
  total, core = models.count_params(params), models.count_params(params, exclude_embeddings=True)
  peak_text = f"{_si(peak)}FLOP/s per device ({source})" if peak else source
  return (f"parameters: {core:,} without embeddings, {total:,} in all; model FLOPs per "
          f"token: {_si(flops.train)}(train), {_si(flops.forward)}(forward); MFU against "
          f"{peak_text}")
