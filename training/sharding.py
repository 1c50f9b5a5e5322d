"""Every device-placement decision of training and evaluation, in one place.

The mesh has two axes: `data` (batch parallelism) and `fsdp` (the batch is split over it
too, and parameters plus optimizer moments are sharded over it). Meshes are built with
`Mesh(devices, names, axis_types=Auto)` on purpose: with Auto axes `jax.jit` takes
`in_shardings`/`out_shardings` and XLA propagates the rest (`jax.make_mesh` in jax 0.10
gives Explicit axes, which would make sharding part of every array's type).

Parameters carry logical axis names (`nn.with_logical_partitioning` in models/);
`LOGICAL_AXIS_RULES` maps them onto mesh axes. A dimension that the mesh axis size does
not divide stays replicated, so any config runs on any mesh.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()` (which reads the
cluster from the environment) when `train.multihost` is set or the launcher's environment
says the job spans several processes: `JAX_COORDINATOR_ADDRESS` set, SLURM with
`SLURM_NTASKS` > 1, Open MPI with `OMPI_COMM_WORLD_SIZE` > 1, or a multi-host Cloud TPU
(`TPU_WORKER_HOSTNAMES` lists several hosts).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from common.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes

# (logical axis name, mesh axis), in priority order; names not listed stay replicated.
# models/ names param axes "embed", "mlp", "heads", "kv", "vocab": FSDP splits "embed".
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (("embed", "fsdp"),)


def multihost_requested(train_config: ml_collections.ConfigDict) -> bool:
  """True if `train.multihost` is set or the launcher's environment names several processes."""
  env = os.environ
  return (bool(train_config.multihost)
          or bool(env.get("JAX_COORDINATOR_ADDRESS"))
          or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed(train_config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize()` once, when the job is multi-host; a no-op otherwise.

  Must run before anything touches the devices (`jax.devices()`, the first array).
  """
  if multihost_requested(train_config) and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def mesh_shape(mesh_data: int, mesh_fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 (all remaining devices) and checks data * fsdp == num_devices."""
  if mesh_data == -1 and mesh_fsdp == -1:
    raise UserError("train.mesh_data and train.mesh_fsdp are both -1; set at most one to -1")
  if mesh_data == 0 or mesh_fsdp == 0 or mesh_data < -1 or mesh_fsdp < -1:
    raise UserError(f"mesh sizes must be positive or -1, got train.mesh_data={mesh_data} "
                    f"train.mesh_fsdp={mesh_fsdp}")
  fixed = mesh_fsdp if mesh_data == -1 else mesh_data if mesh_fsdp == -1 else None
  if fixed is not None:
    if num_devices % fixed:
      raise UserError(f"{num_devices} devices cannot be split into mesh axes of size {fixed}; "
                      f"set train.mesh_data / train.mesh_fsdp to divisors of {num_devices}")
    rest = num_devices // fixed
    mesh_data, mesh_fsdp = (rest, mesh_fsdp) if mesh_data == -1 else (mesh_data, rest)
  if mesh_data * mesh_fsdp != num_devices:
    raise UserError(f"mesh {mesh_data}x{mesh_fsdp} (train.mesh_data x train.mesh_fsdp) needs "
                    f"{mesh_data * mesh_fsdp} devices but {num_devices} are present; "
                    f"use -1 for one axis to take all remaining devices")
  return mesh_data, mesh_fsdp


def make_mesh(train_config: ml_collections.ConfigDict | None = None,
              devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh with Auto axis types over `devices` (default: all devices).

  Sizes from `train.mesh_data` x `train.mesh_fsdp`; no config: all devices on `data`.
  """
  devices = jax.devices() if devices is None else devices
  data, fsdp = (-1, 1) if train_config is None else (train_config.mesh_data,
                                                     train_config.mesh_fsdp)
  shape = mesh_shape(data, fsdp, len(devices))
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, rng keys, metrics)."""
  return NamedSharding(mesh, P())


def _divisible(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` without mesh axes of size 1 or absent from `mesh`, and with every dimension
  whose size its mesh axes do not divide left replicated."""
  entries = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in names)
    entries.append(None if not names or dim % size else names[0] if len(names) == 1 else names)
  return P(*entries)


def param_shardings(logical_specs: Any, abstract_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for params from PartitionSpecs of logical axis names (`models.param_axes`).

  A None spec (a param without logical names) is replicated.
  """
  is_spec = lambda x: x is None or isinstance(x, P)
  return jax.tree.map(
      lambda spec, p: NamedSharding(mesh, _divisible(
          nn.logical_to_mesh_axes(spec or P(), LOGICAL_AXIS_RULES), p.shape, mesh)),
      logical_specs, abstract_params, is_leaf=is_spec)


def spec_on_mesh(spec: P, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """A saved PartitionSpec placed on `mesh` (axes the mesh lacks or cannot divide replicate)."""
  return NamedSharding(mesh, _divisible(spec, shape, mesh))


def state_shardings(abstract_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state: every subtree shaped like the params (the params,
  Adam's mu and nu) follows the param shardings; everything else is replicated."""
  params_def = jax.tree.structure(params_sharding,
                                  is_leaf=lambda x: isinstance(x, NamedSharding))

  def like_params(node: Any) -> bool:
    return jax.tree.structure(node) == params_def

  return jax.tree.map(lambda node: params_sharding if like_params(node) else replicated(mesh),
                      abstract_state, is_leaf=like_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch dimension split over (data, fsdp); other dimensions whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _batch_ways_per_process(mesh: Mesh) -> int:
  """How many ways this process's part of a batch is split (the mesh's batch axes)."""
  return max(math.prod(mesh.shape[a] for a in BATCH_AXES) // jax.process_count(), 1)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh,
                      fields: tuple[str, ...] = ("data.batch_size", "eval.batch_size")) -> None:
  """UserError, before anything is built or run, unless each batch size (a dotted config
  field) splits over this process's share of the mesh's batch axes (as `shard_batch`)."""
  per_process = _batch_ways_per_process(mesh)
  for field in fields:
    section, name = field.split(".")
    value = config[section][name]
    if value % per_process:
      raise UserError(f"{field}={value} does not split over the {per_process} data-parallel "
                      f"devices of this process (train.mesh_data x train.mesh_fsdp); set "
                      f"--config.{field} to a multiple of {per_process}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, split along the batch dimension.

  Single process: `batch` is the global batch. Multi-host: each process passes its own
  slice of the global batch (global size = local size * process count).
  """
  sharding = batch_sharding(mesh)
  per_process = _batch_ways_per_process(mesh)
  out = {}
  for name, value in batch.items():
    if value.shape[0] % per_process:
      raise UserError(f"batch of {value.shape[0]} ({name!r}) does not split over "
                      f"{per_process} devices; make data.batch_size a multiple of "
                      f"train.mesh_data * train.mesh_fsdp")
    if jax.process_count() == 1:
      out[name] = jax.device_put(value, sharding)
    else:
      out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
