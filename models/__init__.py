"""Pure Flax models (no I/O), one module per family, looked up by `config.model.name`.

    model = models.get_model(config.model)
    params = models.init_params(config.model, rng, batch)       # float32, unboxed
    axes = models.param_axes(config.model, batch)               # logical PartitionSpecs
    loss, aux = models.make_loss_fn(config.model)(params, batch, rng)
    n = models.count_params(config, exclude_embeddings=True)   # abstract: nothing allocated

Families (`models/<name>.py`, each exporting `FAMILY`, see `models.family`): transformer
(the baseline decoder), retro, realm, knnlm, incontext. Building blocks: `models.ops`
(attention, MLP, norms), `models.layers` (the spec and the transformer blocks).
Batches follow docs/INTERNALS.md: `inputs`, `targets`, `weights` [B, L], plus what the
family's retrieval request names (`neighbours` [B, C, K, R], REALM `candidates`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import family as family_lib  # noqa: F401 (models.family is the submodule)
from models.family import Family, LossFn
from models.layers import Spec

__all__ = ["Family", "LossFn", "get_family", "get_model", "get_decoder", "init_cache",
           "model_inputs", "init_params", "param_axes", "make_loss_fn", "token_log_probs",
           "chunked_token_log_probs", "lm_loss", "count_params"]
# Parameters that `count_params(..., exclude_embeddings=True)` leaves out: token embedding
# tables (nn.Embed's "embedding") and the untied output projection, as the RETRO paper counts.
_EMBEDDING_PARAMS = ("embedding", "lm_head")


def get_family(model_config: Any) -> Family:
  """The family of `model_config` (a ConfigDict section, a Spec or a name)."""
  name = model_config if isinstance(model_config, str) else model_config.name
  return family_lib.get(name)


def get_model(model_config: Any) -> nn.Module:
  """The Flax module of `model_config.name`'s family."""
  return get_family(model_config).model(Spec.from_config(model_config))


def get_decoder(model_config: Any) -> nn.Module:
  """The module that decodes incrementally (`decode=True`), without remat: the model
  itself, or the family's decoder (REALM: its reader, a `Transformer` on `params["reader"]`)."""
  spec = dataclasses.replace(Spec.from_config(model_config), remat=False)
  fam = get_family(spec)
  return (fam.decoder or fam.model)(spec)


def init_cache(model_config: Any, batch_size: int, length: int) -> Any:
  """The zeroed decoding cache of `get_decoder` for `batch_size` sequences of `length` tokens.

      logits_BxTxV, mutated = decoder.apply({"params": params, "cache": cache}, tokens_BxT,
                                            decode=True, mutable=["cache"])
      cache = mutated["cache"]

  Each call appends T tokens (RETRO: one; pass `neighbours` [B, 1, K, R] of chunk c with
  the token that completes it, position (c+1)m-1, else None).
  """
  spec = Spec.from_config(model_config)
  args = get_family(spec).decode_init_args(spec, batch_size, length)
  decoder = get_decoder(spec)
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), *args, decode=True))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes["cache"])


def model_inputs(model_config: Any, batch: Mapping[str, jax.Array]) -> tuple:
  """The positional arguments of the model's `apply` after the variables, from a batch."""
  spec = Spec.from_config(model_config)
  return get_family(spec).inputs(spec, batch)


def init_params(model_config: Any, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
  """Float32 parameters (plain arrays; logical axes come from `param_axes`)."""
  model = get_model(model_config)
  init = jax.jit(lambda r, args: model.init(r, *args))
  return nn.unbox(init(rng, model_inputs(model_config, batch))["params"])


def param_axes(model_config: Any, batch: Mapping[str, jax.Array]) -> Any:
  """Pytree (like the params) of PartitionSpecs of logical axis names, e.g. P("embed", "mlp")."""
  model = get_model(model_config)
  abstract = jax.eval_shape(lambda r, args: model.init(r, *args), jax.random.key(0),
                            model_inputs(model_config, batch))
  return nn.get_partition_spec(abstract["params"])


def count_params(config_or_params: Any, exclude_embeddings: bool = False) -> int:
  """Parameters of a params pytree (arrays or shapes), or of a full config's model built
  abstractly (`jax.eval_shape`: nothing allocated or compiled; `data.seq_len` sizes the
  example inputs). With `exclude_embeddings`, without the token embedding tables and the
  output projection, as the RETRO paper counts."""
  params = config_or_params
  if isinstance(params, ml_collections.ConfigDict):
    spec = Spec.from_config(params.model)
    fam = get_family(spec)
    batch = fam.example_batch(spec, 1, params.data.seq_len, np.random.default_rng(0))
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        fam.inputs(spec, batch))
    model = fam.model(spec)
    params = nn.unbox(jax.eval_shape(lambda a: model.init(jax.random.key(0), *a), args))["params"]
  return sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if not (exclude_embeddings and any(getattr(k, "key", None) in _EMBEDDING_PARAMS
                                                for k in path)))


def make_loss_fn(model_config: Any) -> LossFn:
  """`loss_fn(params, batch, rng) -> (loss, aux)` of the family; rng=None: no dropout (eval).

  aux holds at least `nll_sum` (sum_t w_t * -log p(y_t)) and `tokens` (sum_t w_t), both
  float32, with loss = nll_sum / tokens; families add their own diagnostics.
  """
  spec = Spec.from_config(model_config)
  return get_family(spec).loss(spec)


def apply_fn(spec: Spec):
  """`run(params, batch, rng) -> model outputs` for a family's loss: dropout when an rng is
  given and the model has dropout; the positional inputs from `model_inputs`."""
  fam = get_family(spec)
  model = fam.model(spec)

  def run(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
    deterministic = rng is None or spec.dropout == 0.0
    rngs = {} if deterministic else {"dropout": rng}
    return model.apply({"params": params}, *fam.inputs(spec, batch),
                       deterministic=deterministic, rngs=rngs)

  return run


def lm_loss(spec: Spec) -> LossFn:
  """The language-model loss: token-weighted mean cross-entropy of the model's logits.

  With `spec.loss_chunk` > 0 the model returns its final normalised states (`head="hidden"`)
  and `chunked_token_log_probs` projects them `loss_chunk` positions per sequence at a time
  with the model's `project`: the float32 [B, L, V] logits never exist at once (same value
  and gradient).
  """
  chunk = spec.loss_chunk
  run = apply_fn(dataclasses.replace(spec, head="hidden") if chunk else spec)
  model = get_family(spec).model(spec)

  def loss_fn(params, batch, rng):
    out = run(params, batch, rng)
    if chunk:
      project = lambda h: model.apply({"params": params}, h, method="project")  # noqa: E731
      logp_BxL = chunked_token_log_probs(project, out, batch["targets"], chunk)
    else:
      logp_BxL = token_log_probs(out, batch["targets"])
    weights_BxL = batch["weights"].astype(jnp.float32)
    nll_sum = -jnp.sum(logp_BxL * weights_BxL)
    tokens = jnp.sum(weights_BxL)
    return nll_sum / jnp.maximum(tokens, 1.0), {"nll_sum": nll_sum, "tokens": tokens}

  return loss_fn


def token_log_probs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, float32 [B, L] (any leading axes)."""
  return _target_log_prob(logits_BxLxV.astype(jnp.float32), targets_BxL)


def chunked_token_log_probs(project: Any, h_BxLxD: jax.Array, targets_BxL: jax.Array,
                            chunk: int) -> jax.Array:
  """`token_log_probs(project(h), targets)` computed `chunk` positions of every sequence at
  a time: a `jax.lax.map` over sequence blocks (the batch axis stays whole, and sharded),
  each block rematerialised in the backward pass, so only one block's [B, chunk, V]
  logits exist at once. `project` maps states [..., D] to float32 logits [..., V]."""
  B, L, D = h_BxLxD.shape
  blocks = -(-L // chunk)
  pad = blocks * chunk - L
  h_nxBxCxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(
      B, blocks, chunk, D).transpose(1, 0, 2, 3)
  t_nxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(B, blocks, chunk).transpose(1, 0, 2)
  block = jax.checkpoint(lambda h_BxCxD, t_BxC: _target_log_prob(
      project(h_BxCxD).astype(jnp.float32), t_BxC))
  logp_nxBxC = jax.lax.map(lambda ht: block(*ht), (h_nxBxCxD, t_nxBxC))
  return logp_nxBxC.transpose(1, 0, 2).reshape(B, blocks * chunk)[:, :L]


@jax.custom_vjp
def _target_log_prob(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  return _target_log_prob_fwd(logits_BxLxV, targets_BxL)[0]


def _target_log_prob_fwd(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return target_BxL - lse_BxL, (logits_BxLxV, targets_BxL, lse_BxL)


def _target_log_prob_bwd(residuals, g_BxL: jax.Array):
  """d/dlogits = g * (onehot(target) - softmax) in one fused pass over the logits: autodiff
  would keep exp(logits) from the forward and scatter the target gradient into a zero
  [B, L, V] array, two more full-size buffers."""
  logits_BxLxV, targets_BxL, lse_BxL = residuals
  onehot_BxLxV = targets_BxL[..., None] == jnp.arange(logits_BxLxV.shape[-1])
  probs_BxLxV = jnp.exp(logits_BxLxV - lse_BxL[..., None])
  dlogits_BxLxV = g_BxL[..., None] * (onehot_BxLxV.astype(jnp.float32) - probs_BxLxV)
  return dlogits_BxLxV, None


_target_log_prob.defvjp(_target_log_prob_fwd, _target_log_prob_bwd)
