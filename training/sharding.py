"""Every device-placement decision of training and evaluation, in one place.

The mesh has two axes: `data` (batch parallelism) and `fsdp` (the batch is split over it
too, and parameters plus optimizer moments are sharded over it). Meshes are built with
`Mesh(devices, names, axis_types=Auto)` on purpose: with Auto axes `jax.jit` takes
`in_shardings`/`out_shardings` and XLA propagates the rest (`jax.make_mesh` in jax 0.10
gives Explicit axes, which would make sharding part of every array's type).

Parameters carry logical axis names (`nn.with_logical_partitioning` in models/);
`LOGICAL_AXIS_RULES` maps them onto mesh axes. A dimension that the mesh axis size does
not divide stays replicated, so any config runs on any mesh.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()` when
`train.multihost` is set or the launcher's environment says the job spans several
processes: `JAX_COORDINATOR_ADDRESS` set (with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`,
which this module reads), SLURM with `SLURM_NTASKS` > 1, Open MPI with
`OMPI_COMM_WORLD_SIZE` > 1, or a multi-host Cloud TPU (`TPU_WORKER_HOSTNAMES` lists several
hosts); jax detects the cluster from the variables not given. Every process then loads
only its own rows of each global batch (`process_rows`), which `shard_batch` assembles into
one global array; CPU processes talk through gloo (jax's default CPU collectives).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from common.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes

# Lower-case texts of the errors a collective or the coordination service raises when
# another process of the job is gone (gloo's TCP pairs, the coordination service's RPCs).
PEER_LOST_TEXTS = ("gloo", "connection closed by peer", "connection reset by peer",
                   "heartbeat", "coordination service", "socket closed")

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


def _env_int(name: str) -> int | None:
  """An integer environment variable, None if unset; UserError if it is not an integer."""
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name}={value!r} is not an integer; set it to the number the launcher "
                    f"gives (e.g. {name}=0)") from None


def initialize_distributed(train_config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize()` once, when the job is multi-host; a no-op otherwise.

  The process count and id come from `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` when set, else
  from jax's cluster detection (SLURM, Open MPI, Cloud TPU, ...). A process that stops
  sending heartbeats for `train.heartbeat_timeout_s` seconds stops the others. Must run
  before anything touches the devices (`jax.devices()`, the first array).
  """
  if not multihost_requested(train_config) or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                               process_id=_env_int("JAX_PROCESS_ID"),
                               heartbeat_timeout_seconds=int(train_config.heartbeat_timeout_s))
  except ValueError as e:  # jax could not tell the coordinator, process count or id
    raise UserError(f"cannot start a multi-process run ({e}); set JAX_COORDINATOR_ADDRESS "
                    f"(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or "
                    f"launch under SLURM / Open MPI / a Cloud TPU") from None


class PeerLost(UserError):
  """Another process of a multi-process job stopped, so this one cannot go on.

  `skip_cleanup`: `cli_main` exits at once after the one line, because jax's own exit
  handler would wait at a shutdown barrier for the process that is gone, then abort.
  """

  skip_cleanup = True


@contextlib.contextmanager
def stop_if_peer_lost() -> Iterator[None]:
  """Turns the error of a collective whose peer process died into one `PeerLost` line.

  A single process, or any other error, passes through unchanged.
  """
  try:
    yield
  except (RuntimeError, ValueError) as e:
    text = " ".join(str(e).split())
    if jax.process_count() == 1 or not any(t in text.lower() for t in PEER_LOST_TEXTS):
      raise
    raise PeerLost(f"process {jax.process_index()} of {jax.process_count()} stops: another "
                   f"process of this job is gone ({text[:160]}); rerun every process with "
                   f"the same command to resume from the last checkpoint") from None


def sync_processes(name: str) -> None:
  """Waits until every process of the job reaches the point `name`; a no-op in one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same_on_processes(value: str, what: str) -> None:
  """UserError unless every process holds the same `value` (a hash naming `what`)."""
  if jax.process_count() == 1:
    return
  code_N = np.frombuffer(value.encode().ljust(256)[:256], dtype=np.uint8)
  everyone_PxN = multihost_utils.process_allgather(code_N)
  if not np.all(everyone_PxN == everyone_PxN[0]):
    raise UserError(f"the processes of this job hold different {what}; put data.cache_dir "
                    f"on storage every host reads (or build the artifacts once, before "
                    f"training, into a shared cache)")


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


def _batch_ways(mesh: Mesh) -> int:
  """How many ways a global batch is split (the product of the mesh's batch axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh,
                      fields: tuple[str, ...] = ("data.batch_size", "eval.batch_size")) -> None:
  """UserError, before anything is built or run, unless each global batch size (a dotted
  config field) splits over the mesh's batch axes, across all processes (as `shard_batch`)."""
  ways = _batch_ways(mesh)
  for field in fields:
    section, name = field.split(".")
    value = config[section][name]
    if value % ways:
      raise UserError(f"{field}={value} does not split over the {ways} data-parallel "
                      f"devices (train.mesh_data x train.mesh_fsdp, all processes); set "
                      f"--config.{field} to a multiple of {ways}")


def process_rows(mesh: Mesh, global_size: int) -> np.ndarray:
  """int64 [b]: the rows of a global batch of `global_size` that this process loads.

  They are the rows `batch_sharding(mesh)` places on this process's devices, in order,
  which is the layout `jax.make_array_from_process_local_data` expects of the local data.
  One process: every row.
  """
  ways = _batch_ways(mesh)
  if global_size % ways:
    raise UserError(f"a batch of {global_size} does not split over {ways} devices; make "
                    f"data.batch_size and eval.batch_size multiples of {ways} "
                    f"(train.mesh_data x train.mesh_fsdp)")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  rows = {r for (rows_slice,) in index_map.values()
          for r in range(*rows_slice.indices(global_size))}
  return np.asarray(sorted(rows), dtype=np.int64)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                global_size: int | None = None) -> dict[str, jax.Array]:
  """Places a batch on the mesh as global arrays split along the batch dimension.

  `global_size` given: `batch` holds only this process's rows (`process_rows(mesh,
  global_size)`) of a global batch of that size. None: `batch` is the whole global batch
  (every process holds the same), of which each process contributes its own rows.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch.items():
    size = value.shape[0] if global_size is None else global_size
    rows = process_rows(mesh, size)
    local = value if global_size is not None or len(rows) == size else value[rows]
    if local.shape[0] != len(rows):
      raise ValueError(f"{name!r} holds {local.shape[0]} rows; this process loads "
                       f"{len(rows)} of the global batch of {size}")
    out[name] = jax.make_array_from_process_local_data(sharding, local,
                                                       (size, *value.shape[1:]))
  return out
