"""The train state, the optimizer (with frozen parameters: `train.trainable`) and its
learning-rate schedule, sharded initialisation, and warm starts (`train.init_from`).

    mesh = sharding.make_mesh(config.train)
    state, shardings = create_train_state(config, jax.random.PRNGKey(config.seed), batch, mesh)
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

import models
from common.errors import UserError
from training import checkpoint, sharding

# (model_config, rng, batch) -> params (plain arrays), like `models.init_params`.
InitFn = Callable[[ml_collections.ConfigDict, jax.Array, Mapping[str, jax.Array]], Any]
# (model_config, batch) -> logical-axis PartitionSpecs like the params: `models.param_axes`.
AxesFn = Callable[[ml_collections.ConfigDict, Mapping[str, jax.Array]], Any]


@struct.dataclass
class TrainState:
  """Everything a step changes; a pytree of arrays only, so it is donated and checkpointed whole.

  `rng` is a raw uint32[2] key; the step folds `step` into it for its dropout key.
  """
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2]


def lr_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps` (step 0 already gets lr/warmup),
  then cosine decay to `learning_rate * min_lr_ratio` at `steps`."""
  t = train_config
  if t.steps <= 0 or not 0 <= t.warmup_steps <= t.steps:
    raise UserError(f"need train.steps > 0 and 0 <= train.warmup_steps <= train.steps, got "
                    f"steps={t.steps} warmup_steps={t.warmup_steps}")
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  peak, warmup, ratio = t.learning_rate, t.warmup_steps, t.min_lr_ratio
  decay_steps = max(t.steps - warmup, 1)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = peak * (ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: norms' scales and biases (ndim < 2) are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_path(path: tuple) -> str:
  """A parameter's "/"-joined path, e.g. "blocks_2/cross_attn/query/kernel"."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(train_config: ml_collections.ConfigDict, params: Any) -> Any:
  """Pytree of bools like `params`: True where a `train.trainable` pattern matches the
  parameter's path (every parameter when there are none)."""
  patterns = [re.compile(p) for p in train_config.trainable]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not patterns or any(p.search(param_path(path)) for p in patterns), params)


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping (off when train.grad_clip <= 0), then AdamW on `lr_schedule`;
  with `train.trainable`, parameters no pattern matches get no update (frozen)."""
  t = train_config
  tx = optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                   mask=_decay_mask)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  if not t.trainable:
    return tx
  labels = lambda params: jax.tree.map(lambda train: "train" if train else "frozen",  # noqa: E731
                                       trainable_mask(t, params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _layout(config: ml_collections.ConfigDict, example_batch: Mapping[str, Any], mesh: Mesh,
            init_fn: InitFn, axes_fn: AxesFn
            ) -> tuple[Callable[[jax.Array], TrainState], Any, Any]:
  """(init: rng -> TrainState, abstract state, state shardings) for this config and mesh."""
  tx = make_optimizer(config.train)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example_batch.items()}

  def init(rng: jax.Array) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    params = init_fn(config.model, params_rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  params_sharding = sharding.param_shardings(axes_fn(config.model, shapes), abstract.params,
                                             mesh)
  return init, abstract, sharding.state_shardings(abstract, params_sharding, mesh)


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       example_batch: Mapping[str, Any], mesh: Mesh,
                       init_fn: InitFn = models.init_params,
                       axes_fn: AxesFn = models.param_axes) -> tuple[TrainState, Any]:
  """A fresh state whose params and optimizer moments are created already sharded.

  Args:
    config: the full config (`model` and `train` are read).
    rng: `jax.random.PRNGKey(config.seed)` (a typed `jax.random.key` is converted to raw).
    example_batch: arrays or ShapeDtypeStructs with the shapes of one global batch.
    mesh: from `sharding.make_mesh`.
    init_fn: (model_config, rng, batch) -> params.
    axes_fn: (model_config, batch) -> logical PartitionSpecs like the params.

  Returns:
    (state, state_shardings): the shardings pytree mirrors the state.
  """
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  init, _, shardings = _layout(config, example_batch, mesh, init_fn, axes_fn)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(config: ml_collections.ConfigDict, example_batch: Mapping[str, Any],
                         mesh: Mesh, init_fn: InitFn = models.init_params,
                         axes_fn: AxesFn = models.param_axes) -> TrainState:
  """The state as `jax.ShapeDtypeStruct`s carrying their target shardings (restore template)."""
  _, abstract, shardings = _layout(config, example_batch, mesh, init_fn, axes_fn)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def warm_start(config: ml_collections.ConfigDict, state: TrainState, shardings: Any,
               hashes: Mapping[str, str]) -> TrainState:
  """The fresh `state` with the parameters of `train.init_from`'s latest checkpoint copied in.

  Every parameter whose path the checkpoint also has takes its value (RETRO-fitting: a
  baseline's decoder under fresh CCA and encoder); the optimizer state starts anew for the
  merged parameters. UserError if the checkpoint was trained on other data (`hashes`: this
  run's artifact hashes), a shared path has another shape, or nothing is shared.
  """
  source = config.train.init_from
  meta = checkpoint.restore_meta(source)
  for key in ("tokenizer", "dataset"):
    if meta.get("hashes", {}).get(key, hashes[key]) != hashes[key]:
      raise UserError(f"train.init_from={source} was trained on another {key}; warm start "
                      f"from a checkpoint of the same data.corpus and data.tokenizer")
  loaded = {param_path(p): v for p, v in
            jax.tree_util.tree_leaves_with_path(checkpoint.load_params(source))}
  here = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
  shared = [k for k in here if k in loaded]
  for k in shared:
    if loaded[k].shape != here[k].shape:
      raise UserError(f"train.init_from={source}: parameter {k} has shape "
                      f"{tuple(loaded[k].shape)} there and {tuple(here[k].shape)} here; warm "
                      f"start from a checkpoint of the same model sizes")
  if not shared:
    raise UserError(f"train.init_from={source} shares no parameter path with model "
                    f"{config.model.name!r}; warm start from a checkpoint of a model this one "
                    f"extends (e.g. a baseline for RETRO)")
  params = jax.tree_util.tree_map_with_path(lambda p, v: loaded.get(param_path(p), v),
                                            state.params)
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(make_optimizer(config.train).init,
                      out_shardings=shardings.opt_state)(params)
  frozen = sum(not m for m in jax.tree.leaves(trainable_mask(config.train, params)))
  print(f"warm start from {source} (step {meta['step']}): {len(shared)} of {len(here)} "
        f"parameter arrays copied, {frozen} frozen (train.trainable)", flush=True)
  return state.replace(params=params, opt_state=opt_state)
