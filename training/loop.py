"""The training loop behind `train.py`: artifacts -> state -> steps -> checkpoints -> eval.

    metrics = train_and_evaluate(configs.load("tiny_retro"), "/tmp/run")

Batches are a pure function of (seed, step), so a checkpoint's step is the data position
and a rerun in the same workdir resumes exactly where the last checkpoint left off: a run
killed at any point (even mid-save) and rerun ends with bit-identical parameters.

What is never lost or trusted wrongly (docs/RELIABILITY.md has the full table):
- SIGTERM/SIGINT during training: the current step finishes, a checkpoint of it is saved,
  and the run returns normally (`train.py` exits 0); a second signal stops at once.
- A non-finite loss, gradient or parameter norm stops training with a `UserError` naming
  the step; metrics are always checked before a checkpoint is saved, so a bad state is
  never written and the last good checkpoint stays the latest.
- A workdir resumes only the model (type and shapes) and artifacts it was started with.
- One training process per workdir (`training.lock`): a second one stops with a `UserError`
  naming the first, before it writes anything there.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm.auto import tqdm

import configs
import models
from common.artifacts import atomic_write_text
from common.errors import UserError
from data import dataset
from retrieval import build, curriculum
from training import checkpoint, flops as flops_lib, metrics as metrics_lib, refresh, sharding
from training.lock import RunLock
from training.stop import StopSignals
from training.state import abstract_train_state, create_train_state, warm_start
from training.step import make_train_step

HOST_ONLY_KEYS = ("index",)  # batch entries for the host (citations), never sent to devices
FINITE_KEYS = ("loss", "grad_norm", "param_norm")  # checked every step, before any save
# Model fields a resumed run may change: they do not change the parameters' shapes.
RESUMABLE_MODEL_FIELDS = ("dropout", "dtype", "remat", "attention", "loss_chunk")


def device_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                 drop: tuple[str, ...] = (), global_size: int | None = None
                 ) -> dict[str, jax.Array]:
  """The model's part of a host batch, split over the mesh's batch axes.

  `global_size`: `batch` holds this process's rows of a global batch of that size
  (`sharding.process_rows`); None: `batch` is the whole global batch.
  """
  keep = {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS and k not in drop}
  return sharding.shard_batch(keep, mesh, global_size)


def train_batch(config: ml_collections.ConfigDict, artifacts: build.Artifacts,
                step: int, mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
  """This process's rows (`sharding.process_rows`; all of them without `mesh`) of training
  batch number `step`, whose sequences are a pure function of seed and step."""
  split = artifacts.prepared.train
  idx_B = dataset.batch_indices(split.num_sequences, config.data.batch_size, config.seed, step)
  if mesh is not None:
    idx_B = idx_B[sharding.process_rows(mesh, len(idx_B))]
  return curriculum.copy_neighbours(artifacts.batch("train", idx_B), config, step)


def eval_batch(artifacts: build.Artifacts, split: str, idx_B: np.ndarray, score_from: int
               ) -> dict[str, np.ndarray]:
  """Evaluation batch `idx_B` of `split` with the targets of positions < `score_from` unscored."""
  batch = artifacts.batch(split, idx_B)
  batch["weights"][:, :score_from] = 0.0
  return batch


def make_eval_fn(model_config: ml_collections.ConfigDict
                 ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Jitted (params, batch) -> {nll_sum, tokens, ...}: the loss without dropout."""
  loss_fn = models.make_loss_fn(model_config)
  return jax.jit(lambda params, batch: loss_fn(params, batch, None)[1])


def evaluate_split(eval_fn: Callable, params: Any, artifacts: build.Artifacts, split: str,
                   batch_size: int, max_batches: int, mesh: jax.sharding.Mesh,
                   drop: tuple[str, ...] = (), desc: str = "eval", score_from: int = 0
                   ) -> dict[str, float]:
  """Perplexity over `split` (the first `max_batches` batches; 0 = all), scoring the targets
  of input positions >= `score_from` (`eval.score_from`: every model on the same tokens),
  plus the family's other diagnostics in the loss's aux (REALM: `gold_rank`, `null_prob`,
  ...), each the mean over batches weighted by their tokens."""
  num = artifacts.prepared.split(split).num_sequences
  batches = list(dataset.eval_indices(num, batch_size))
  if max_batches > 0:
    batches = batches[:max_batches]
  nll_sum, tokens = 0.0, 0.0
  weighted: dict[str, float] = {}
  pending = []
  rows_b = sharding.process_rows(mesh, batch_size)  # this process's rows of every batch
  for idx_B in tqdm(batches, desc=desc, unit="batch", leave=False,
                    disable=jax.process_index() != 0):
    batch = eval_batch(artifacts, split, idx_B[rows_b], score_from)
    pending.append(eval_fn(params, device_batch(batch, mesh, drop, batch_size)))
  for aux in jax.device_get(pending):
    nll_sum += float(aux["nll_sum"])
    tokens += float(aux["tokens"])
    for key in aux.keys() - {"nll_sum", "tokens"}:
      weighted[key] = weighted.get(key, 0.0) + float(aux[key]) * float(aux["tokens"])
  loss = nll_sum / max(tokens, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
          "batches": len(batches), **{k: v / max(tokens, 1.0) for k, v in sorted(weighted.items())}}


def _check_finite(step: int, host_metrics: Mapping[str, float], workdir: epath.Path,
                  last_saved: int | None) -> None:
  """UserError naming the step if the loss, gradient or (updated) parameter norm is not finite.

  `param_norm` is of the parameters after the update, so a state that passes is safe to save.
  """
  bad = [k for k in FINITE_KEYS if k in host_metrics and not math.isfinite(host_metrics[k])]
  if not bad:
    return
  values = ", ".join(f"{k} is {host_metrics[k]}" for k in bad)
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was saved")
  raise UserError(f"training diverged at step {step}: {values}; the bad state was not saved and "
                  f"{kept} in {workdir}; lower --config.train.learning_rate or raise "
                  f"--config.train.warmup_steps, then rerun to resume")


def _saved_meta(workdir: epath.Path) -> dict[str, Any] | None:
  """The metadata of the latest checkpoint in `workdir`, or None if it has none."""
  if not checkpoint.checkpoint_dir(workdir).is_dir():
    return None
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    return ckpt.restore_meta() if ckpt.latest_step() is not None else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Builds what is missing, trains `config.train.steps` steps (resuming), evaluates.

  Returns the final metrics: `eval/loss`, `eval/perplexity`, `train/loss`, `step`, plus
  `eval/no_retrieval/*` for RETRO and phase `timings` in seconds.

  Holds the workdir's lock (`training.lock`) while it runs: a second process training in
  the same workdir stops with a one-line UserError before it changes anything there.

  Multi-process (`training.sharding.initialize_distributed`): each process loads only its
  rows of every batch; process 0 builds the artifacts while the others wait, then all load
  them; only process 0 writes files other than checkpoint shards. When another process
  dies, the rest stop with one `sharding.PeerLost` line.
  """
  sharding.initialize_distributed(config.train)
  try:
    with RunLock(workdir) as lock:
      return _train_and_evaluate(config, checkpoint.workdir_path(workdir), lock)
  except UserError as e:
    # The other processes may wait for this one at a barrier: exiting at once (not through
    # jax's shutdown barrier) lets them stop with one `sharding.PeerLost` line.
    e.skip_cleanup = jax.process_count() > 1 or getattr(e, "skip_cleanup", False)
    raise


def _build_artifacts(config: ml_collections.ConfigDict) -> build.Artifacts:
  """`build.build_all` on process 0 while the others wait, then loaded by the others; UserError
  if the processes ended up with different artifacts (caches that are not shared)."""
  if jax.process_index() == 0:
    artifacts = build.build_all(config)
  sharding.sync_processes("artifacts built")
  if jax.process_index() != 0:
    artifacts = build.build_all(config)  # cached by now (when data.cache_dir is shared)
  sharding.check_same_on_processes(json.dumps(artifacts.hashes, sort_keys=True),
                                   "artifacts (data, tokenizer, retrieval)")
  return artifacts


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        lock: RunLock) -> dict[str, Any]:
  timings: dict[str, float] = {}
  t = config.train
  # An existing workdir is locked before anything in it is read or written. A new one is
  # created (and locked) only once its artifacts are built, so a failed start leaves none.
  new_workdir = not workdir.is_dir()
  if not new_workdir:
    lock.acquire()
  saved = _saved_meta(workdir)
  sharding.sync_processes("workdir inspected")  # before process 0 changes it
  if saved is not None:
    _check_same_model(saved, config, workdir)  # before any slow artifact build

  mesh = sharding.make_mesh(t)
  sharding.check_batch_sizes(config, mesh)  # before any slow build, not at the final eval
  refresh.check_processes(config)
  start = time.perf_counter()
  artifacts = _build_artifacts(config)
  timings["artifacts"] = time.perf_counter() - start
  print(build.summary(artifacts), flush=True)

  start = time.perf_counter()
  example = {k: v for k, v in train_batch(config, artifacts, 0, mesh).items()
             if k not in HOST_ONLY_KEYS}
  meta = {"config": config.to_json_best_effort(), "hashes": artifacts.hashes,
          "model": config.model.name}
  if new_workdir:
    lock.acquire()  # creates the workdir
    saved = _saved_meta(workdir)  # a run that started here meanwhile may have saved
    if saved is not None:
      _check_same_model(saved, config, workdir)
  sharding.sync_processes("workdir locked")  # every process has read it before it changes
  if saved is not None:
    _check_same_run(saved, meta, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint.Checkpoints.from_config(workdir, t)
  first = 0
  if ckpt.latest_step() is not None:
    abstract = abstract_train_state(config, example, mesh)
    state, saved = ckpt.restore(None, abstract)
    first = int(saved["step"])
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    print(f"resuming from step {first} in {workdir}", flush=True)
  else:
    state, shardings = create_train_state(config, jax.random.PRNGKey(config.seed), example, mesh)
    if t.init_from:
      state = warm_start(config, state, shardings, artifacts.hashes)
  if jax.process_index() == 0:
    atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
  loss_fn = models.make_loss_fn(config.model)
  step_fn = make_train_step(config, loss_fn, shardings, mesh)
  eval_fn = make_eval_fn(config.model)
  model_flops = flops_lib.model_flops(config.model, config.data.seq_len)
  peak, source = flops_lib.peak_flops_per_s(jax.devices()[0], config.model.dtype, 1024)
  print(flops_lib.summary(state.params, model_flops, peak, source), flush=True)
  timings["init"] = time.perf_counter() - start

  refreshed_at = 0
  every = refresh.refresh_every(config)
  if every and first >= every:
    refreshed_at = first - first % every
    artifacts = refresh.refresh_candidates(config, artifacts, state.params)

  writer = metrics_lib.MetricsWriter(workdir, resume_step=first)  # drops a dead run's records
  lagged = metrics_lib.Lagged()
  tokens_per_step = config.data.batch_size * config.data.seq_len
  last_saved = ckpt.latest_step()
  final: dict[str, Any] = {}
  bar = tqdm(total=t.steps, initial=first, desc=f"train {config.name}", unit="step",
             dynamic_ncols=True, disable=jax.process_index() != 0)
  start = time.perf_counter()
  last_tick, last_tick_step = time.perf_counter(), first

  def record(done: tuple[int, dict[str, Any]] | None) -> None:
    nonlocal last_tick, last_tick_step
    if done is None:
      return
    step, host = done
    _check_finite(step, host, workdir, last_saved)
    final["train/loss"] = host["loss"]
    if step % t.log_every == 0 or step == t.steps:
      now = time.perf_counter()
      rate = (step - last_tick_step) * tokens_per_step / max(now - last_tick, 1e-9)
      last_tick, last_tick_step = now, step
      host = {**host, "tokens_per_second": rate}
      if peak:  # model FLOPs utilisation: training.flops
        host["mfu"] = rate * model_flops.train / (peak * jax.device_count())
      writer.write(step, host)
      bar.set_postfix(loss=f"{host['loss']:.3f}", tok_s=f"{rate:,.0f}")

  end = min(t.steps, t.stop_after) if t.stop_after > 0 else t.steps
  done = first
  stop = StopSignals(ckpt)
  peer_lost = False
  try:
    with stop, sharding.stop_if_peer_lost():
      for step in range(first, end):
        if every and step > 0 and step % every == 0 and step != refreshed_at:
          artifacts = refresh.refresh_candidates(config, artifacts, state.params)
          refreshed_at = step
        batch = device_batch(train_batch(config, artifacts, step, mesh), mesh,
                             global_size=config.data.batch_size)
        state, step_metrics = step_fn(state, batch)
        if every:
          step_metrics = {**step_metrics, "index_age_steps": np.float32(step - refreshed_at)}
        record(lagged.push(step + 1, step_metrics))
        bar.update(1)
        done = step + 1
        stopping = stop.requested(done)
        if done % t.checkpoint_every == 0 or done == end or stopping:
          record(lagged.flush())  # never save a state whose metrics we have not checked
          if ckpt.save(done, state, meta, force=done == end or stopping):
            last_saved = done
        if stopping:
          ckpt.wait_until_finished()
          break
        if done % t.eval_every == 0 and done != t.steps:
          ev = evaluate_split(eval_fn, state.params, artifacts, "validation",
                              config.eval.batch_size, config.eval.batches, mesh,
                              score_from=config.eval.score_from)
          writer.write(done, ev, prefix="eval")
          tqdm.write(f"step {done}: eval loss {ev['loss']:.4f} perplexity {ev['perplexity']:.2f}")
      record(lagged.flush())
  except sharding.PeerLost:
    peer_lost = True  # closing orbax would wait at a barrier for the process that is gone
    raise
  finally:
    bar.close()
    if not peer_lost:
      ckpt.close()
  train_time = time.perf_counter() - start
  timings["train"] = train_time
  if stop.reason is not None or end < t.steps:
    writer.close()
    if stop.reason is not None:
      print(f"stopped at step {done} on {stop.reason}: checkpoint saved in "
            f"{ckpt.directory / str(done)}; rerun the same command to resume", flush=True)
    else:
      print(f"stopped at step {end} (train.stop_after); rerun without it to resume", flush=True)
    return {**final, "step": done, "stopped": stop.reason or "stop_after", "timings": timings}

  start = time.perf_counter()
  with sharding.stop_if_peer_lost():
    final.update(_final_eval(config, eval_fn, state.params, artifacts, mesh, writer, t.steps))
  timings["eval"] = time.perf_counter() - start
  writer.close()
  writes = jax.process_index() == 0
  if writes and (workdir / metrics_lib.JSONL).exists() and final.get("train/loss") is not None:
    metrics_lib.write_loss_plot(workdir / metrics_lib.JSONL, workdir / "loss.png")
  steps_run = t.steps - first
  final.update(step=t.steps, timings=timings,
               train_tokens_per_second=steps_run * tokens_per_step / max(train_time, 1e-9))
  if writes:
    atomic_write_text(workdir / "final_metrics.json", json.dumps(final, indent=2))
  return final


def _final_eval(config: ml_collections.ConfigDict, eval_fn: Callable, params: Any,
                artifacts: build.Artifacts, mesh: jax.sharding.Mesh,
                writer: metrics_lib.MetricsWriter, step: int) -> dict[str, float]:
  """Validation metrics at the end, for each of the family's evaluation variants (RETRO
  and In-Context RALM also without retrieval: `eval/no_retrieval/*`)."""
  out = {}
  variants = [("/".join(filter(None, ("eval", v.key))), v.drop)
              for v in models.get_family(config.model).eval_variants]
  for prefix, drop in variants:
    ev = evaluate_split(eval_fn, params, artifacts, "validation", config.eval.batch_size,
                        config.eval.batches, mesh, drop=drop, desc=prefix,
                        score_from=config.eval.score_from)
    writer.write(step, ev, prefix=prefix)
    out.update({f"{prefix}/{k}": v for k, v in ev.items()})
  return out


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _check_same_model(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                      workdir: epath.Path) -> None:
  """A workdir resumes only the model it was started with: same type, same shapes."""
  fix = (f"use another --workdir, or resume with the config it was trained with "
         f"(see {workdir}/config.json)")
  if saved.get("model") != config.model.name:
    raise UserError(f"{workdir} holds a checkpoint of model {saved.get('model')!r}, this config "
                    f"trains {config.model.name!r}; {fix}")
  old = _flat(configs.from_json(saved["config"]).model.to_dict())
  new = _flat(config.model.to_dict())
  changed = [k for k in sorted(set(old) | set(new))
             if k.split(".")[0] not in RESUMABLE_MODEL_FIELDS and old.get(k) != new.get(k)]
  if changed:
    more = f" (and {len(changed) - 1} more model fields)" if len(changed) > 1 else ""
    k = changed[0]
    raise UserError(f"{workdir} holds a checkpoint with model.{k}={old.get(k)!r}, this config "
                    f"has model.{k}={new.get(k)!r}{more}; {fix}")


def _check_same_run(saved: Mapping[str, Any], meta: Mapping[str, Any],
                    workdir: epath.Path) -> None:
  """A workdir resumes only on the artifacts (data, tokenizer, retrieval) it was started with."""
  stale = [k for k, v in meta["hashes"].items() if saved.get("hashes", {}).get(k, v) != v]
  if stale:
    raise UserError(f"{workdir} was trained on other artifacts ({', '.join(stale)} changed); "
                    f"use another --workdir or restore the original data/config")
