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

Crash safety: orbax writes each step into `<step>.orbax-checkpoint-tmp/` and renames it into
place when complete, so a process killed mid-save leaves only a tmp directory, which is
never listed as a step and is deleted when the next writer opens the directory (one
writer per workdir: `training.lock`; readers may read while it trains). A save
that fails because the disk is full raises a one-line `UserError` naming the step, and its
partial directory is deleted on `close()`; the earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import threading
from typing import Any, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, PartitionSpec as P

from common.errors import UserError
from training import sharding

CHECKPOINT_DIR = "checkpoints"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """A run directory as an `epath.Path`: URIs (gs://bucket/run) as given, local paths
  made absolute (orbax wants absolute paths; `Path.absolute` would mangle a URI)."""
  path = epath.Path(workdir)
  return path if "://" in os.fspath(workdir) else path.absolute()


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / CHECKPOINT_DIR


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardSave)
  registry.add("state", ocp.args.StandardRestore)
  registry.add("meta", ocp.args.JsonSave)
  registry.add("meta", ocp.args.JsonRestore)
  return registry


def _short(error: BaseException, limit: int = 160) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _AbandonedReadFilter(logging.Filter):
  """Drops asyncio's "Future/Task exception was never retrieved" for a tensorstore read that
  a failed restore abandoned (it is collected later, possibly during other work)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith(("Future exception was never retrieved",
                               "Task exception was never retrieved")):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return "tensorstore_spec" not in message + str(error)


def _quiet_abandoned_reads() -> None:
  """Drops the reports of reads a failed restore abandoned ("Event loop is closed", and
  asyncio's never-retrieved futures of those reads: `_AbandonedReadFilter`).

  When one array of a checkpoint cannot be read, orbax closes its event loop while
  tensorstore still finishes the other reads; their callbacks then fail, and Python prints
  each as an unraisable RuntimeError traceback after the one-line error. Only those are
  dropped; every other unraisable exception still reaches the previous hook.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadFilter())
  previous = sys.unraisablehook
  if getattr(previous, "quiets_abandoned_reads", False):
    return

  def hook(unraisable: Any) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook


def _unreadable(step_dir: epath.Path, error: Exception, earlier: list[int]) -> UserError:
  """One line for any failure to read a checkpoint (orbax and tensorstore raise many types).

  `earlier`: the saved steps before this one (the fix names the one to fall back to).
  """
  fix = (f"delete {step_dir} to fall back to the checkpoint of step {earlier[-1]}" if earlier
         else f"no earlier checkpoint exists: delete {step_dir.parent} and retrain")
  return UserError(f"checkpoint {step_dir} is truncated, corrupt or from another config "
                   f"({_short(error)}); {fix}")


def _is_disk_full(error: BaseException) -> bool:
  """ENOSPC/EDQUOT from Python, or tensorstore's text for them, anywhere in the chain."""
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(e) for text in _DISK_FULL_TEXTS):
      return True
    e = e.__cause__ or e.__context__
  return False


class Checkpoints:
  """An orbax CheckpointManager for (state, meta) items: async saves, keeps the last `keep`.

  Saves happen at steps that are multiples of `every` (or with `force=True`).
  Use as a context manager, or call `close()`: it waits for the last async save.
  A failed save (disk full: a one-line UserError) surfaces in the next `save`,
  `wait_until_finished` or `close`; `close` deletes its partial step directory.
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
    if not read_only:
      self._remove_unfinished("*")  # steps a killed process left half-written
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_registry())
    self._saving: int | None = None  # the step of the save in flight
    self._failed: list[int] = []  # steps whose save failed (partial files removed on close)
    self._threads_before: set[threading.Thread] = set()  # alive when the last save started

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
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    self.wait_until_finished()  # the previous save's failure is reported as that step's
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave({**meta, "step": step}))
    self._saving = step
    self._threads_before = set(threading.enumerate())
    with self._failures():
      return self._manager.save(step, args=args, force=True)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight is on disk; UserError if the disk filled up."""
    with self._failures():
      self._manager.wait_until_finished()
    self._saving = None

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True once every host has reached the preemption sync point after a host
    got SIGTERM (JAX's preemption service); always False in a single process."""
    return self._manager.reached_preemption(step)

  @contextlib.contextmanager
  def _failures(self) -> Iterator[None]:
    """Notes the step of a failed save; a full disk becomes a one-line UserError."""
    try:
      yield
    except Exception as e:
      step, self._saving = self._saving, None
      if step is None:
        raise
      self._failed.append(step)
      if not _is_disk_full(e):
        raise
      raise self._disk_full(step) from e

  def _disk_full(self, step: int) -> UserError:
    self._manager.reload()  # the manager's own list may hold the step that failed
    earlier = [s for s in self._manager.all_steps() if s != step]
    free_mib = shutil.disk_usage(self.directory).free / 2**20
    kept = (f"the checkpoint of step {max(earlier)} is intact" if earlier
            else "no earlier checkpoint exists")
    return UserError(f"the disk is full: the checkpoint of step {step} could not be written "
                     f"to {self.directory} ({free_mib:.1f} MiB free); {kept} and the partial "
                     f"step {step} is discarded; free space (or lower "
                     f"--config.train.keep_checkpoints) and rerun the same command to resume")

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

  def _unreadable(self, step: int, error: Exception) -> UserError:
    return _unreadable(self.directory / str(step), error,
                       [s for s in self.all_steps() if s < step])

  def _restore(self, step: int, **items: Any) -> Any:
    _quiet_abandoned_reads()
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._unreadable(step, e) from e

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
      raise self._unreadable(step, e) from e

  def close(self) -> None:
    """Waits for the save in flight (UserError if the disk filled up), then releases."""
    try:
      self.wait_until_finished()
    except BaseException:
      with contextlib.suppress(Exception):  # the error above is the one to report
        self._close_manager()
      raise
    self._close_manager()

  def _close_manager(self) -> None:
    """Closes orbax, then deletes the partial directories of failed saves.

    Orbax stops waiting at a save's first error while its other writer threads may still
    be writing into that step's tmp directory: those threads finish before it is deleted.
    """
    self._manager.close()
    if not self._failed:
      return
    for thread in set(threading.enumerate()) - self._threads_before:
      if not thread.daemon and thread is not threading.current_thread():
        thread.join(timeout=300)
    for step in self._failed:
      self._remove_unfinished(str(step))

  def _remove_unfinished(self, step: str) -> None:
    """Deletes the tmp directories of unfinished saves of `step` ("*": any step).

    Synchronously, before anything is saved (orbax's own `cleanup_tmp_directories` runs in
    a thread that a short-lived process can outlive); on process 0 only.
    """
    if jax.process_index() == 0 and self.directory.is_dir():
      for tmp in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
        with contextlib.suppress(OSError):
          tmp.rmtree()

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
    earlier = [s for s in ckpt.all_steps() if s < step]
  template = {"params": jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                     sharding=sharding.spec_on_mesh(_saved_spec(m), m.shape, mesh)),
      params_md)}
  args = ocp.args.PyTreeRestore(item=template, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(template))
  _quiet_abandoned_reads()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(state_dir, args=args)["params"]
  except Exception as e:
    raise _unreadable(state_dir.parent, e, earlier) from e


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, Any]:
  """(resolved config, params) of a checkpoint (latest if `step` is None).

  The params are placed on whatever devices are present (all on the `data` axis), however
  many devices saved them: this is what a notebook calls (re-exported as
  `train.load_checkpoint`). `workdir` may also be a run bundle (`training.bundle`): a
  folder, `gs://...`, `hf://org/name` or a Hub repo id `org/name`; its config then points
  into the bundle, whose artifacts evaluation and generation read without rebuilding.
  """
  import configs
  from training import bundle

  workdir = bundle.local(workdir)
  meta = restore_meta(workdir, step)
  config = bundle.load_config(workdir)
  if config is None:
    config = configs.from_json(meta["config"])
  params = load_params(workdir, meta["step"])
  return config, params
