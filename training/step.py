"""The one train step shared by every model: `step(state, batch) -> (state, metrics)`.

    train_step = make_train_step(config, models.make_loss_fn(config.model), shardings, mesh)
    state, metrics = train_step(state, sharding.shard_batch(batch, mesh))

It is a pure function of (state, batch): dropout's key is `fold_in(state.rng, state.step)`.
The state is donated (its buffers are reused for the new state; do not touch the old one
afterwards), and metrics come back as replicated device scalars (see `metrics.Lagged`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from training import sharding
from training.state import TrainState, lr_schedule, make_optimizer, trainable_mask

# (params, batch, rng) -> (loss, aux); aux holds at least "nll_sum" and "tokens".
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def train_step_fn(train_config: ml_collections.ConfigDict, loss_fn: LossFn) -> StepFn:
  """The un-jitted step: AdamW update of `loss_fn`, with loss, aux, grad/param norms and lr.

  With `train.trainable`, frozen parameters' gradients are replaced by zeros before anything
  reads them, so XLA drops their computation (RETRO-fitting backpropagates only from the
  first layer that reads the neighbours) and `grad_norm` is the trainable parameters'.
  """
  tx = make_optimizer(train_config)
  schedule = lr_schedule(train_config)

  def step(state: TrainState, batch: Mapping[str, jax.Array]
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    if train_config.trainable:
      grads = jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), grads,
                           trainable_mask(train_config, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**aux, "loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "lr": schedule(state.step)}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=state.rng)
    return new_state, metrics

  return step


def make_train_step(config: ml_collections.ConfigDict, loss_fn: LossFn, state_shardings: Any,
                    mesh: Mesh) -> StepFn:
  """`train_step_fn` jitted for `mesh`: state in/out with `state_shardings` (donated), batch
  split over (data, fsdp), metrics replicated. It is traced with `mesh` as the abstract
  mesh, so kernels that must run per shard (splash attention) find it."""
  step = train_step_fn(config.train, loss_fn)

  def step_on_mesh(state: TrainState, batch: Mapping[str, jax.Array]
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(state, batch)

  return jax.jit(step_on_mesh,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)
