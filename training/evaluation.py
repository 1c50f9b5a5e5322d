"""Evaluation behind `eval.py`: perplexity of any checkpoint, with or without retrieval,
with another datastore, with the first k retrieved items, as another compatible family
(a baseline as In-Context RALM), kNN-LM interpolation sweeps, and perplexity by overlap
of each chunk with its RETRO neighbours (`training.overlap_eval`).

    results = evaluate("runs/retro_small")                        # RETRO with retrieval
    results = evaluate("runs/knnlm_small", knn={"lam": 0.25, "k": 16})
    results = evaluate("runs/baseline_small", max_overlap=0.125)  # chunks of little overlap
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import configs
import models
from common.artifacts import atomic_write_text, fingerprint
from common.errors import UserError
from models import knnlm
from models.layers import Spec
from data import dataset
from retrieval import build, edit, knn_datastore as knn_lib
from training import bundle, checkpoint, loop, overlap_eval, refresh, sharding

# The lambda sweep's grid, fine at small lambda: with a 1.5M-token datastore and a small LM
# the best lambda is 0.05 or below (the protocol's baseline, 400 steps: 0.05 at its low edge).
LAMBDAS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def _with(config: ml_collections.ConfigDict, overrides: list[str], **fields: Any
          ) -> ml_collections.ConfigDict:
  """A validated copy of `config` with dotted overrides and fields replaced
  (`**{"retrieval.datastore": "x"}`)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for override in [*(f"{key}={value}" for key, value in fields.items()), *overrides]:
    configs.apply_override(out, override)
  configs.validate(out)
  out.lock()
  return out


def knn_settings(config: ml_collections.ConfigDict, knn: Mapping[str, Any] | bool | None
                  ) -> dict[str, Any] | None:
  if not knn:
    return None
  e = config.eval
  settings = {"lam": e.knn_lam, "k": e.knn_k, "temperature": e.knn_temperature,
              "exact": e.knn_exact}
  if isinstance(knn, Mapping):
    unknown = set(knn) - set(settings)
    if unknown:
      raise UserError(f"unknown kNN settings {sorted(unknown)}; use {sorted(settings)}")
    settings.update({k: v for k, v in knn.items() if v is not None})
  return settings


def evaluate(workdir: str | os.PathLike, split: str = "validation", retrieval: bool = True,
             knn: Mapping[str, Any] | bool | None = None, *, step: int | None = None,
             datastore: str | None = None, drop_heldout: bool | None = None,
             k: int | None = None, model: str | None = None,
             overrides: Sequence[str] = (), batches: int | None = None, write: bool = True,
             max_overlap: float | None = None, overlap: bool = True,
             without: Sequence[str] = ()) -> dict[str, Any]:
  """Perplexity of the checkpoint in `workdir` on `split`.

  Args:
    retrieval: feed what the family retrieves (False: the same model without it; for
      RETRO and In-Context RALM the plain decoder).
    knn: kNN-LM: True or {"lam", "k", "temperature", "exact"} (defaults from config.eval);
      adds `knn/*` results, a lambda sweep (table + `knn_sweep.png`) and approximate vs
      exact distances. Works for any family whose model returns a kNN key.
    datastore: a corpus spec whose chunks replace the training datastore (no retraining),
      e.g. "shakespeare_folio".
    drop_heldout: drop datastore documents named like a validation document (default: as
      trained, `retrieval.datastore_drop_heldout`); False lets another edition of a
      held-out text into the datastore (leakage, the RETRO paper's overlap analysis).
    k: read only the first k retrieved items per query (REALM candidates, RETRO or
      In-Context documents; default config.eval.num_neighbours, 0 = all).
    model: evaluate the checkpoint's parameters as this family (they must fit it), e.g. a
      baseline as "incontext".
    overrides: dotted config overrides (`"model.incontext.stride=32"`) applied before.
    batches: evaluate only this many batches (default config.eval.batches; 0 = all).
    max_overlap: score only the targets of chunks whose 8-gram overlap with the RETRO
      neighbours they are predicted from is <= this (the paper's filtered evaluation).
    overlap: measure the overlap at all (False: no overlap reference is built or read;
      no `overlap_buckets`).
    without: document ids or globs removed from the datastore first, no retraining (an
      opt-out: `retrieval.edit`; the datastore is `datastore` or the model's, the training
      split's documents if it retrieves from its training split), and from the kNN-LM
      datastore (`knn_datastore.without`).
  Returns:
    {"perplexity", "loss", "tokens", ...}; with overlap also `overlap_buckets` (one row per
    bucket: tokens, loss, perplexity, ...), `overlap` (the reference), `max_overlap`, and
    `chunks`: per-[sequence, chunk] arrays (`overlap_eval.ChunkScores`; left out of
    `<workdir>/eval_<split>.json`, where the rest is written).
  """
  overlap_eval.check_max_overlap(max_overlap)
  if max_overlap is not None and not overlap:
    raise UserError("max_overlap filters by overlap; it cannot be combined with overlap=False")
  workdir = bundle.local(workdir)
  if not (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first: python train.py --config NAME "
                    f"--workdir {workdir}")
  config, params = checkpoint.load_checkpoint(workdir, step)
  if split not in dataset.SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {', '.join(dataset.SPLITS)}")
  fields = {"model.name": model} if model else {}
  if datastore:
    fields["retrieval.datastore"] = datastore
  if drop_heldout is not None:
    fields["retrieval.datastore_drop_heldout"] = drop_heldout
  config = _with(config, list(overrides), **fields)
  request = build.retrieval_request(config)
  if (datastore or drop_heldout is not None) and request is None:
    raise UserError(f"--datastore/--heldout swap the datastore; model {config.model.name!r} "
                    "reads none")
  if without and request is None and not knn:
    raise UserError(f"--without removes datastore documents; model {config.model.name!r} "
                    f"reads no datastore (add --knn for a kNN-LM datastore)")
  if without and request is not None:
    version = edit.edit_datastore(config, dataset.prepare(config), without)
    config = _with(config, [], **{"retrieval.datastore": str(version.directory)})
  if model:
    _check_params_fit(config, params, workdir)
  max_batches = config.eval.batches if batches is None else batches
  mesh = sharding.make_mesh()
  sharding.check_batch_sizes(config, mesh, ("eval.batch_size",))
  # A checkpoint evaluated as another family has no training artifact: build only `split`.
  artifacts = build.build_all(config, splits=(split,) if model else None)
  saved = checkpoint.restore_meta(workdir, step)
  check_data(saved, artifacts.prepared.hashes, workdir)
  result: dict[str, Any] = {"workdir": str(workdir), "step": saved["step"],
                            "model": config.model.name, "split": split}
  drop: tuple[str, ...] = ()
  reference_artifacts = artifacts  # before a refresh or `k` changes what the model reads
  if request is not None:
    result["retrieval"] = bool(retrieval)
    result["datastore"] = config.retrieval.datastore or "train split"
    result["datastore_version"] = artifacts.datastore.hash
    result["datastore_edits"] = list(artifacts.datastore.edits)
    result["datastore_drop_heldout"] = config.retrieval.datastore_drop_heldout
    if refresh.refresh_every(config):  # the index as the run left it: re-embedded by these params
      artifacts = refresh.refresh_candidates(config, artifacts, params)
      result["index"] = f"refreshed at step {saved['step']}"
    else:
      result["index"] = "frozen"
    if not retrieval:
      drop = request.batch_keys
    k = config.eval.num_neighbours if k is None else k
    result["k"] = k or request.k
    if k:
      artifacts = _first_k(artifacts, k)
  settings = knn_settings(config, knn)
  # The kNN-LM datastore first: a stale one stops before the overlap reference is built.
  knn_store = None
  if settings is not None:
    if not models.get_family(config.model).knn_key:
      raise UserError(f"kNN-LM evaluation needs a decoder LM checkpoint (one that returns a "
                      f"kNN key), not model {config.model.name!r}")
    knn_store = knn_datastore(config, params, artifacts.prepared, saved["step"], without)
    if without:
      store = knn_store[0]
      result["knn_without"] = {"removed": store.manifest["removed"],
                               "removed_entries": store.manifest["removed_entries"],
                               "entries": store.manifest["entries"]}
  ref = None
  if overlap:
    num = artifacts.prepared.split(split).num_sequences
    if max_batches > 0:
      num = min(num, max_batches * config.eval.batch_size)
    ref = overlap_eval.reference(config, reference_artifacts, split, num)
    result.update(max_overlap=max_overlap, overlap=ref.describe())
    result.update(overlap_eval.score_split(
        overlap_eval.make_chunk_eval_fn(config.model), params, artifacts, split,
        config.eval.batch_size, max_batches, mesh, ref, max_overlap, drop,
        score_from=config.eval.score_from))
  else:
    result.update(loop.evaluate_split(loop.make_eval_fn(config.model), params, artifacts,
                                      split, config.eval.batch_size, max_batches, mesh, drop,
                                      score_from=config.eval.score_from))
  if knn_store is not None:
    result["knn"] = knn_evaluate(config, params, knn_store, artifacts, split, settings,
                                 max_batches, workdir if write else None, ref, max_overlap)
  if write:
    atomic_write_text(workdir / f"eval_{split}.json",
                      json.dumps(overlap_eval.json_ready(result), indent=2))
  return result


def _check_params_fit(config: ml_collections.ConfigDict, params: Any, workdir: Path) -> None:
  """UserError unless the checkpoint's parameters have the tree and shapes of the model."""
  spec = Spec.from_config(config.model)
  batch = models.get_family(spec).example_batch(spec, 1, config.data.seq_len,
                                                np.random.default_rng(0))
  want = jax.eval_shape(lambda: models.init_params(config.model, jax.random.key(0), batch))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if shapes(want) != shapes(params):
    raise UserError(f"the parameters in {workdir} do not fit model {config.model.name!r} "
                    f"(another parameter tree or shapes); evaluate it as the model it was "
                    f"trained as (see {workdir}/config.json)")


def check_data(saved: Mapping[str, Any], hashes: Mapping[str, str], workdir: Path) -> None:
  trained = saved.get("hashes", {})
  for key in ("corpus", "tokenizer", "dataset"):
    if key in trained and trained[key] != hashes[key]:
      raise UserError(f"the checkpoint in {workdir} was trained with {key} {trained[key]}, but "
                      f"this data has {key} {hashes[key]}; evaluate with the config it was "
                      f"trained with (see {workdir}/config.json)")


def _first_k(artifacts: build.Artifacts, k: int) -> build.Artifacts:
  """Artifacts whose batches carry only the first k retrieved items of every query."""
  retrieved = artifacts.retrieved
  have = retrieved.k
  if not 1 <= k <= have:
    raise UserError(f"k={k} but {have} items were retrieved per query; choose 1..{have} or "
                    f"rebuild with --config.model.num_neighbours={k}")
  return dataclasses.replace(artifacts, retrieved=retrieved.first_k(k))


def params_hash(params: Any) -> str:
  leaves = jax.tree.leaves(jax.device_get(params))
  return fingerprint([float(np.asarray(x, np.float64).sum()) for x in leaves]
                     + [list(np.shape(x)) for x in leaves])


def knn_datastore(config: ml_collections.ConfigDict, params: Any, prepared: dataset.Prepared,
                  step: int | None, without: Sequence[str] = ()
                  ) -> tuple[knn_lib.KnnDatastore, Callable[..., Any]]:
  """The kNN-LM datastore of the training split under `params` (built once per checkpoint:
  `step` and a hash of the params key the cache), and the jitted
  `apply(params, inputs) -> (logits, keys)` that made its keys; `without`: document ids or
  globs whose entries are removed (`knn_datastore.without`). One process only: UserError
  in a multi-process job (the keys of the whole training split are computed here)."""
  if jax.process_count() > 1:
    raise UserError(f"the kNN-LM datastore is built by one process, not "
                    f"{jax.process_count()}; build it in a single-process run (python eval.py "
                    f"--workdir DIR, on one host)")
  model = models.get_model(config.model)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_key=True))
  model_hash = f"step{step}-{params_hash(params)}" if step is not None else \
      f"params-{params_hash(params)}"
  store = knn_lib.knn_datastore(config, prepared, lambda x: apply(params, x)[1], model_hash)
  if without:
    store = knn_lib.without(store, prepared.train, without, config.retrieval.nprobe,
                            config.retrieval.ef_search)
  return store, apply


def weighted_perplexity(logp_N: np.ndarray, weights_N: np.ndarray) -> float:
  """exp of the weighted mean negative log-probability. Weight-0 entries (padding) are left
  out rather than multiplied, so a -inf there (pure kNN, lam=1) cannot make 0 * inf = nan;
  a -inf on a real token gives inf."""
  nll = -(np.where(weights_N > 0, logp_N, 0.0) * weights_N).sum()
  return float(np.exp(nll / max(weights_N.sum(), 1.0)))


def knn_evaluate(config: ml_collections.ConfigDict, params: Any,
                 knn_store: tuple[knn_lib.KnnDatastore, Callable[..., Any]],
                 artifacts: build.Artifacts, split: str, settings: Mapping[str, Any],
                 max_batches: int, out_dir: Path | None,
                 ref: overlap_eval.ChunkOverlap | None = None,
                 max_overlap: float | None = None) -> dict[str, Any]:
  """kNN-LM perplexity at `settings["lam"]`, a lambda sweep, and exact vs approximate, with
  `knn_store` = `knn_datastore(...)`. With `ref`: only targets of chunks with overlap <=
  `max_overlap` are scored, and the result has `overlap_buckets` at `settings["lam"]`."""
  store, apply = knn_store
  T, k = settings["temperature"], int(settings["k"])
  knn_target = jax.jit(lambda d, t, y: knnlm.knn_target_log_probs(d, t, y, T))
  lm_target = jax.jit(models.token_log_probs)
  part = artifacts.prepared.split(split)
  idx = list(dataset.eval_indices(part.num_sequences, config.eval.batch_size))
  if max_batches > 0:
    idx = idx[:max_batches]
  lm, approx, exact, weights = [], [], [], []
  for idx_B in tqdm(idx, desc="kNN-LM eval", unit="batch", leave=False):
    batch = part.batch(idx_B)
    if ref is not None:
      overlap_eval.filter_weights(batch, ref.per_target(idx_B, part.seq_len), max_overlap)
    logits, keys = apply(params, batch["inputs"])
    B, L, D = keys.shape
    q_NxD = np.asarray(keys).reshape(B * L, D)
    lm.append(np.asarray(lm_target(logits, batch["targets"])))
    for out, use_exact in ((approx, False), (exact, True)):
      if use_exact and store.exact_distances:  # the index's distances are exact already
        out.append(approx[-1])
        continue
      d_NxK, t_NxK = store.search(q_NxD, k, exact=use_exact)
      out.append(np.asarray(knn_target(d_NxK.reshape(B, L, k), t_NxK.reshape(B, L, k),
                                       batch["targets"])))
    weights.append(np.where(np.arange(L) < config.eval.score_from, 0.0, batch["weights"]))
  w = np.concatenate(weights).ravel()
  lm_t = np.concatenate(lm).ravel()
  knn_t = {"approximate": np.concatenate(approx).ravel(), "exact": np.concatenate(exact).ravel()}

  def ppl(lam: float, which: str) -> float:
    return weighted_perplexity(
        np.asarray(knnlm.interpolate(jnp.asarray(lm_t), jnp.asarray(knn_t[which]), lam)), w)

  which = "exact" if settings["exact"] else "approximate"
  sweep = [{"lam": lam, "perplexity_approximate": ppl(lam, "approximate"),
            "perplexity_exact": ppl(lam, "exact")} for lam in LAMBDAS]
  best = min(sweep, key=lambda r: r[f"perplexity_{which}"])
  out = {**settings, "datastore_size": int(store.keys.shape[0]),
         "index": store.manifest["index_spec"],
         "index_recall": store.manifest.get("recall_at_k"),  # measured when it was built
         "perplexity": ppl(float(settings["lam"]), which),
         "lm_perplexity": ppl(0.0, which), "best_lam": best["lam"],
         "best_perplexity": best[f"perplexity_{which}"], "sweep": sweep}
  if ref is not None:
    logp = np.asarray(knnlm.interpolate(jnp.asarray(lm_t), jnp.asarray(knn_t[which]),
                                        float(settings["lam"])))
    out["overlap_buckets"] = overlap_eval.token_buckets(
        logp.reshape(-1, part.seq_len), w.reshape(-1, part.seq_len),
        np.concatenate(idx), ref)
  if out_dir is not None:
    _plot_sweep(sweep, out_dir / "knn_sweep.png")
  return out


def _plot_sweep(sweep: list[dict[str, float]], path: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4), dpi=100)
  ax = fig.add_subplot()
  lams = [r["lam"] for r in sweep]
  for key, label in (("perplexity_approximate", "approximate distances"),
                     ("perplexity_exact", "exact distances")):
    ax.plot(lams, [r[key] for r in sweep], marker="o", label=label)
  ax.set_xlabel("λ (weight of the kNN distribution)")
  ax.set_ylabel("validation perplexity")
  ax.set_yscale("log")
  ax.set_title("kNN-LM interpolation sweep")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def format_table(results: list[dict[str, Any]]) -> str:
  """A plain-text table of evaluation results (one row per variant)."""
  rows = [("variant", "perplexity", "loss", "tokens")]
  for r in results:
    rows.append((r.get("variant", r["model"]), f"{r['perplexity']:.3f}", f"{r['loss']:.4f}",
                 f"{int(r['tokens'])}"))
    knn = r.get("knn")
    if knn:
      rows.append((f"  kNN-LM λ={knn['lam']} k={knn['k']}", f"{knn['perplexity']:.3f}", "", ""))
      rows.append((f"  kNN-LM best λ={knn['best_lam']}", f"{knn['best_perplexity']:.3f}", "", ""))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  if any(r.get("knn") for r in results):
    lines.append("")
    lines.append("λ sweep (approximate / exact distances):")
    for r in results:
      for s in r.get("knn", {}).get("sweep", []):
        lines.append(f"  λ={s['lam']:<5} {s['perplexity_approximate']:.3f} / "
                     f"{s['perplexity_exact']:.3f}")
  return "\n".join(lines)
