"""Pure Flax models (no I/O): Transformer, RETRO, REALM reader, kNN-LM; one loss for all.

    model = models.get_model(config.model)
    params = models.init_params(config.model, rng, batch)       # float32, unboxed
    axes = models.param_axes(config.model, batch)               # logical PartitionSpecs
    loss, aux = models.make_loss_fn(config.model)(params, batch, rng)

Batches follow docs/INTERNALS.md: `inputs`, `targets`, `weights` [B, L], plus
`neighbours` [B, C, K, R] (RETRO; absent = no retrieval) or `candidates` [B, K, m] and
`candidate_embeddings` [B, K, E] (REALM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.errors import UserError
from models.layers import Spec
from models.realm import RealmReader, marginal_log_likelihood
from models.retro import Retro
from models.transformer import Transformer

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array | None],
                  tuple[jax.Array, dict[str, jax.Array]]]


def get_model(model_config: Any) -> nn.Module:
  """The module for `model_config.name`: transformer | retro | realm | knnlm (a Transformer)."""
  spec = Spec.from_config(model_config)
  return {"transformer": Transformer, "knnlm": Transformer, "retro": Retro,
          "realm": RealmReader}[spec.name](spec)


def get_decoder(model_config: Any) -> nn.Module:
  """The module that decodes incrementally (`decode=True`), without remat: the model
  itself, or for REALM its reader (a `Transformer` on `params["reader"]`)."""
  spec = dataclasses.replace(Spec.from_config(model_config), remat=False)
  return Transformer(spec) if spec.name == "realm" else get_model(spec)


def init_cache(model_config: Any, batch_size: int, length: int) -> Any:
  """The zeroed decoding cache of `get_decoder` for `batch_size` sequences of `length` tokens.

      logits_BxTxV, mutated = decoder.apply({"params": params, "cache": cache}, tokens_BxT,
                                            decode=True, mutable=["cache"])
      cache = mutated["cache"]

  Each call appends T tokens (RETRO: one; pass `neighbours` [B, 1, K, R] of chunk c with
  the token that completes it, position (c+1)m-1, else None).
  """
  spec = Spec.from_config(model_config)
  args = [jnp.zeros((batch_size, length), jnp.int32)]
  if spec.name == "retro":
    chunks = -(-length // spec.chunk_size)
    args.append(jnp.zeros((batch_size, chunks, spec.num_neighbours, spec.neighbour_len),
                          jnp.int32))
  decoder = get_decoder(spec)
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), *args, decode=True))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes["cache"])


def model_inputs(model_config: Any, batch: Mapping[str, jax.Array]) -> tuple:
  """The positional arguments of the model's `apply` after the variables, from a batch."""
  spec = Spec.from_config(model_config)
  if spec.name == "retro":
    return batch["inputs"], batch.get("neighbours")
  if spec.name == "realm":
    if "candidates" not in batch:
      raise UserError("REALM batches need 'candidates' (model.name=realm); build the REALM "
                      "candidates with the retrieval pipeline first")
    return batch["inputs"], batch["candidates"], batch.get("candidate_embeddings")
  return (batch["inputs"],)


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


def token_log_probs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, float32 [B, L] (any leading axes)."""
  return _target_log_prob(logits_BxLxV.astype(jnp.float32), targets_BxL)


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


def make_loss_fn(model_config: Any) -> LossFn:
  """`loss_fn(params, batch, rng) -> (loss, aux)` for any model; rng=None: no dropout (eval).

  Language models: loss = token-weighted mean cross-entropy = nll_sum / tokens, with
  nll_sum = sum_t w_t * -log p(y_t) and tokens = sum_t w_t (both float32 in aux).

  REALM: the weights before position m-1 (m = model.chunk_size) are zeroed, because the
  query inputs[:, :m] contains those targets. With mll_b = log p(y_b|x_b) from
  `marginal_log_likelihood`, nll_sum = -sum_b mll_b, tokens = sum of the remaining
  weights and loss = nll_sum / tokens: the marginal log-likelihood normalised by the
  batch's weighted token count (equal to the mean over examples of -mll_b / tokens_b when
  every example has the same number of weighted tokens, as in packed batches). aux also
  has `retrieval_entropy` (mean over examples, nats) and `null_prob` (mean p(null|x)).
  """
  spec = Spec.from_config(model_config)
  model = get_model(spec)

  def run(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
    deterministic = rng is None or spec.dropout == 0.0
    rngs = {} if deterministic else {"dropout": rng}
    return model.apply({"params": params}, *model_inputs(spec, batch),
                       deterministic=deterministic, rngs=rngs)

  def lm_loss(params, batch, rng):
    logp_BxL = token_log_probs(run(params, batch, rng), batch["targets"])
    weights_BxL = batch["weights"].astype(jnp.float32)
    nll_sum = -jnp.sum(logp_BxL * weights_BxL)
    tokens = jnp.sum(weights_BxL)
    return nll_sum / jnp.maximum(tokens, 1.0), {"nll_sum": nll_sum, "tokens": tokens}

  def realm_loss(params, batch, rng):
    retrieval_BxZ, logits_BxZxLxV = run(params, batch, rng)
    targets_BxZxL = jnp.broadcast_to(batch["targets"][:, None], logits_BxZxLxV.shape[:3])
    logp_BxZxL = token_log_probs(logits_BxZxLxV, targets_BxZxL)
    weights_BxL = batch["weights"].astype(jnp.float32).at[:, :spec.chunk_size - 1].set(0.0)
    mll_B = marginal_log_likelihood(retrieval_BxZ, logp_BxZxL, weights_BxL)
    nll_sum = -jnp.sum(mll_B)
    tokens = jnp.sum(weights_BxL)
    pz_BxZ = jax.nn.softmax(retrieval_BxZ, axis=-1)
    entropy_B = -jnp.sum(pz_BxZ * jax.nn.log_softmax(retrieval_BxZ, axis=-1), axis=-1)
    aux = {"nll_sum": nll_sum, "tokens": tokens, "retrieval_entropy": jnp.mean(entropy_B),
           "null_prob": jnp.mean(pz_BxZ[:, 0])}
    return nll_sum / jnp.maximum(tokens, 1.0), aux

  return realm_loss if spec.name == "realm" else lm_loss
