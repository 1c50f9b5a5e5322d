"""Orbax checkpoints of the train state plus JSON metadata, restorable on any device count.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` is the TrainState (StandardSave);
`meta` is JSON: `step` (the data position: batches are a pure function of it) plus whatever
the caller adds (resolved config JSON, artifact manifest hashes).

    with Checkpoints.from_config(workdir, config.train) as ckpt:
      ckpt.save(step, state, {"config": config.to_json(), "hashes": prepared.hashes})
      ...
      ckpt.save(last_step, state, meta, force=True)   # the final state, whatever the interval
    state, meta = Checkpoints(workdir).restore(None, abstract_train_state(config, batch, mesh))
    params = load_params(workdir)                     # params only, no optimizer state

Restoring onto another mesh or device count needs a template whose leaves carry the target
shardings (`state.abstract_train_state` builds it in code; a template read back from the
checkpoint would lose the optax NamedTuple types).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec as P

from common.errors import UserError
from training import sharding

CHECKPOINT_DIR = "checkpoints"
_FIX = "delete that step directory to fall back to the previous checkpoint, or retrain"


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir).absolute() / CHECKPOINT_DIR


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardSave)
  registry.add("state", ocp.args.StandardRestore)
  registry.add("meta", ocp.args.JsonSave)
  registry.add("meta", ocp.args.JsonRestore)
  return registry


def _unreadable(step_dir: Path, error: Exception) -> UserError:
  """One line for any failure to read a checkpoint (orbax and tensorstore raise many types)."""
  text = " ".join(str(error).split()) or type(error).__name__
  text = text if len(text) <= 160 else text[:157] + "..."
  return UserError(f"checkpoint {step_dir} is truncated, corrupt or from another config "
                   f"({text}); {_FIX}")


class Checkpoints:
  """An orbax CheckpointManager for (state, meta) items: async saves, keeps the last `keep`.

  Saves happen at steps that are multiples of `every` (or with `force=True`).
  Use as a context manager, or call `close()`: it waits for the last async save.
  """

  def __init__(self, workdir: str | os.PathLike, every: int = 1, keep: int | None = None,
               read_only: bool = False):
    if every < 1 or (keep is not None and keep < 1):
      raise UserError(f"need train.checkpoint_every >= 1 and train.keep_checkpoints >= 1, "
                      f"got {every} and {keep}")
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.is_dir():
      raise UserError(f"no checkpoints in {workdir} (missing {self.directory}); train first "
                      f"(python train.py --config NAME --workdir {workdir})")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_registry())

  @classmethod
  def from_config(cls, workdir: str | os.PathLike,
                  train_config: ml_collections.ConfigDict) -> Checkpoints:
    """Every `train.checkpoint_every` steps, keeping the last `train.keep_checkpoints`."""
    return cls(workdir, every=train_config.checkpoint_every, keep=train_config.keep_checkpoints)

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Starts an async save of `state` and `{"step": step, **meta}`.

    Returns False (nothing saved) if `step` is not a multiple of `every` and not forced,
    or is saved already (the final forced save of a run that just saved that step).

    The device arrays are copied before this returns, so the state may be donated right after.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave({**meta, "step": step}))
    return self._manager.save(step, args=args, force=force)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def resolve_step(self, step: int | None) -> int:
    """`step` if saved (None: the latest); UserError naming the saved steps otherwise."""
    steps = self.all_steps()
    if not steps:
      raise UserError(f"no checkpoints in {self.directory}; train first "
                      f"(python train.py --config NAME --workdir DIR)")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise UserError(f"no checkpoint for step {step} in {self.directory}; "
                      f"available steps: {', '.join(map(str, steps))}")
    return step

  def _restore(self, step: int, **items: Any) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise _unreadable(self.directory / str(step), e) from e

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) at `step` (None: latest), placed as `abstract_state`'s shardings say."""
    step = self.resolve_step(step)
    restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                             meta=ocp.args.JsonRestore())
    return restored["state"], restored["meta"]

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata at `step` (None: latest), without touching the state."""
    return self._restore(self.resolve_step(step), meta=ocp.args.JsonRestore())["meta"]

  def params_metadata(self, step: int) -> Any:
    """Shape/dtype/saved-sharding metadata of the params subtree at `step`."""
    try:
      tree = self._manager.item_metadata(step)["state"]
      return tree["params"]
    except Exception as e:
      raise _unreadable(self.directory / str(step), e) from e

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_meta(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The metadata saved with a checkpoint (step, config JSON, hashes); latest if step is None."""
  with Checkpoints(workdir, read_only=True) as ckpt:
    return ckpt.restore_meta(step)


def _saved_spec(leaf_metadata: Any) -> P:
  spec = getattr(leaf_metadata.sharding, "partition_spec", None)
  return P() if spec is None else P(*spec)


def load_params(workdir: str | os.PathLike, step: int | None = None,
                mesh: Mesh | None = None) -> Any:
  """Only the params of a checkpoint (latest if step is None), placed on `mesh`.

  Default mesh: all present devices on the data axis. Each array keeps the mesh axes it was
  saved with where the new mesh has and divides them, and is replicated otherwise; the
  optimizer state is never read.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  with Checkpoints(workdir, read_only=True) as ckpt:
    step = ckpt.resolve_step(step)
    params_md = ckpt.params_metadata(step)
    state_dir = ckpt.directory / str(step) / "state"
  template = {"params": jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                     sharding=sharding.spec_on_mesh(_saved_spec(m), m.shape, mesh)),
      params_md)}
  args = ocp.args.PyTreeRestore(item=template, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(template))
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(state_dir, args=args)["params"]
  except Exception as e:
    raise _unreadable(state_dir.parent, e) from e
