"""`generate`: sample continuations of prompts from a checkpoint, with retrieval and citations.

    from inference import generate, format_generation
    for g in generate("runs/retro_small", ["To be, or not to be"], max_tokens=128, seed=0):
      print(format_generation(g))       # the text, then the datastore chunks that shaped it

The decoding loop is the family's (`Family.sample`, beside its model): it receives a
`Context` with the prompts in lockstep, the sampler, the cached decoding step and the
datastores, and returns who to cite for each span of generated tokens. Citations group
the generated tokens by the 64-token chunks of the whole sequence (prompt included).

Sampling is deterministic for a fixed `seed`: prompt i draws from `fold_in(key(seed), i)`
folded with the position, so its draws do not depend on the other prompts of the batch.
Prompts of different lengths advance in lockstep (a row copies its prompt until the
prompt ends), so all rows share the chunk and stride boundaries.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import models
from common.errors import UserError
from data import dataset
from inference import sampling
from inference.sampling import ChunkCitation, Generation, Neighbour, Sampler
from inference.stores import ChunkStore, KnnStore, chunk_store
from models.layers import Spec
from retrieval import build, edit
from training import bundle, checkpoint
from training.evaluation import check_data, knn_datastore, knn_settings


@dataclasses.dataclass
class Context:
  """What a family's decoding loop (`Family.sample(ctx)`) works with.

  `tokens_BxT` holds the prompts then the samples (`draw` writes position pos+1), `len_B`
  the prompt lengths; `decoder(**static)` is the jitted cached step
  (params, cache, tokens, *args, **kwargs) -> (outputs, cache) and `cache(B, T)` a fresh
  cache; `store` the chunk datastore (None: retrieval off), `k` the items to retrieve per
  query, `knn` the kNN-LM settings (None: off) and `knn_store` its datastore.
  """
  config: ml_collections.ConfigDict
  params: Any
  lockstep: sampling.Lockstep
  sampler: Sampler
  keys_B: jax.Array
  k: int
  knn: dict[str, Any] | None
  store_fn: Callable[[], ChunkStore | None]
  knn_store_fn: Callable[[], KnnStore | None]

  @property
  def spec(self) -> Spec:
    return Spec.from_config(self.config.model)

  @property
  def tokens_BxT(self) -> np.ndarray:
    return self.lockstep.tokens_BxT

  @property
  def len_B(self) -> np.ndarray:
    return self.lockstep.len_B

  @functools.cached_property
  def store(self) -> ChunkStore | None:
    return self.store_fn()

  @functools.cached_property
  def knn_store(self) -> KnnStore | None:
    return self.knn_store_fn()

  def decoder(self, **static: Any) -> Callable:
    return sampling.decode_fn(self.spec, **static)

  def cache(self, batch: int, length: int) -> Any:
    return sampling.init_cache(self.config.model, batch, length)

  def positions(self, desc: str) -> Iterable[int]:
    """The positions to decode from (each call of `draw(pos, ...)` sets pos+1)."""
    return tqdm(range(self.tokens_BxT.shape[1] - 1), desc=desc, unit="tok", leave=False)

  def draw(self, pos: int, logp_BxV: Any) -> None:
    """Samples the tokens at pos+1 from log-probabilities [B, V] (prompt rows keep theirs)."""
    tokens_B = sampling.sample(logp_BxV, self.keys_B, pos, self.sampler)
    self.lockstep.advance(pos, np.asarray(tokens_B), np.asarray(logp_BxV))


def _load(source: str | os.PathLike | tuple[ml_collections.ConfigDict, Any], step: int | None
          ) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any] | None]:
  """(config, params, checkpoint metadata or None) of a workdir or a (config, params) pair."""
  if isinstance(source, tuple):
    if len(source) != 2 or not isinstance(source[0], ml_collections.ConfigDict):
      raise UserError("pass a workdir or a (config, params) pair such as "
                      "train.load_checkpoint(workdir) returns")
    return source[0], source[1], None
  workdir = bundle.local(source)
  if not (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first: python train.py --config NAME "
                    f"--workdir {workdir}")
  config, params = checkpoint.load_checkpoint(workdir, step)
  return config, params, checkpoint.restore_meta(workdir, step)


def _chunk_citations(start: int, token_ids: list[int], m: int, tokenizer: Any,
                     cited: Callable[[int, int], list[Neighbour]]) -> list[ChunkCitation]:
  """Generated tokens (from sequence position `start`) grouped by the sequence's m-token
  chunks, each with `cited(first, last)`: the neighbours for positions first..last."""
  out = []
  pos, stop = start, start + len(token_ids)
  while pos < stop:
    end = min((pos // m + 1) * m, stop)
    out.append(ChunkCitation(start=pos - start, end=end - start,
                             text=tokenizer.decode(token_ids[pos - start:end - start]),
                             neighbours=cited(pos, end - 1)))
    pos = end
  return out


def generate(source: str | os.PathLike | tuple[ml_collections.ConfigDict, Any],
             prompts: Sequence[str], max_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, *, step: int | None = None,
             retrieval: bool = True, knn: Mapping[str, Any] | bool | None = None,
             k: int | None = None, stop_at_eos: bool = True, datastore: str | None = None,
             without: Sequence[str] = ()) -> list[Generation]:
  """Samples a continuation of every prompt (batched), with retrieval and citations.

  Args:
    source: a workdir written by train.py (its checkpoint at `step`, default the latest),
      a run bundle (`training.bundle`: a folder, gs://..., hf://org/name or org/name), or
      `(config, params)` as `train.load_checkpoint` returns.
    prompts: the texts to continue; an empty prompt starts a new document.
    max_tokens: tokens to generate per prompt.
    temperature, top_k, top_p: sampling (temperature 0 = greedy; top_k 0 and top_p 1 = off).
    seed: generation is a pure function of the seed and the prompt (and its index).
    retrieval: False samples without the datastore (RETRO, In-Context RALM: the same decoder).
    knn: kNN-LM settings as for `eval.evaluate`: True or {"lam", "k", "temperature",
      "exact"} (defaults config.eval.knn_*); None = the family's default (on for knnlm).
    k: items retrieved per query (REALM candidates, RETRO / In-Context documents); default
      config.eval.num_neighbours, or model.num_neighbours when that is 0.
    stop_at_eos: end a continuation at the first EOS (the end of a document).
    datastore: retrieve from this datastore (a corpus spec or version) instead.
    without: document ids or globs removed from the datastore first (`retrieval.edit`; the
      training split's documents for a model that retrieves from its training split) and
      from the kNN-LM datastore (`knn_datastore.without`): nothing of them is cited.
  Returns:
    One `Generation` per prompt, in order: text, token ids and log-probs, citations.
  """
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise UserError("prompts must be a non-empty list of strings")
  if max_tokens < 1:
    raise UserError(f"max_tokens={max_tokens} must be >= 1")
  sampler = Sampler(float(temperature), int(top_k), float(top_p))
  sampler.check(vocab_size=None)
  config, params, meta = _load(source, step)
  family = models.get_family(config.model)
  sampler.check(config.model.vocab_size)
  if knn is None:
    knn = family.knn_default
  if knn and not family.knn_key:
    raise UserError(f"kNN-LM sampling needs a decoder LM checkpoint (one that returns a kNN "
                    f"key), not model {config.model.name!r}")
  settings = knn_settings(config, knn)
  k = (config.eval.num_neighbours or config.model.num_neighbours) if k is None else k
  if k < 1:
    raise UserError(f"k={k} must be >= 1 (datastore items retrieved per query)")
  if datastore is not None or without:
    config = copy.deepcopy(config)
    config.retrieval.datastore = config.retrieval.datastore if datastore is None else datastore
  prepared = dataset.prepare(config)
  if meta is not None:
    check_data(meta, prepared.hashes, Path(source))
  if without and build.retrieval_request(config) is not None:
    config.retrieval.datastore = str(edit.edit_datastore(config, prepared, without).directory)
  tok = prepared.tokenizer
  prompt_ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
  lockstep = sampling.Lockstep(prompt_ids, int(max_tokens), tok.eos_id, stop_at_eos)

  def knn_store() -> KnnStore:
    store, _ = knn_datastore(config, params, prepared, meta["step"] if meta else None,
                             without)
    return KnnStore(store, prepared.train, tok)

  ctx = Context(config=config, params=params, lockstep=lockstep, sampler=sampler,
                keys_B=sampling.row_keys(seed, len(prompts)), k=int(k), knn=settings,
                store_fn=lambda: chunk_store(config) if retrieval else None,
                knn_store_fn=knn_store)
  cited = family.sample(ctx)
  m = config.model.chunk_size
  out = []
  for b, prompt in enumerate(prompts):
    ids, logps, reason = lockstep.generated(b)
    out.append(Generation(
        prompt=prompt, text=tok.decode(ids), prompt_ids=prompt_ids[b], token_ids=ids,
        token_logprobs=logps, finish_reason=reason, model=config.model.name,
        citations=_chunk_citations(int(lockstep.len_B[b]), ids, m, tok,
                                   functools.partial(cited, b))))
  return out


def attribution(g: Generation) -> list[dict[str, Any]]:
  """Which datastore documents a generation's citations came from: per document, the
  retrieved items (chunks, kNN-LM entries, candidates) that conditioned it, their share of
  all of them, and the chunks of the generation they conditioned; most cited first."""
  items: dict[str, int] = collections.Counter()
  spans: dict[str, set[int]] = collections.defaultdict(set)
  for i, c in enumerate(g.citations):
    for n in c.neighbours:
      items[n.doc_id] += 1
      spans[n.doc_id].add(i)
  total = sum(items.values())
  return [{"doc_id": doc_id, "items": count, "share": count / total,
           "chunks": len(spans[doc_id])} for doc_id, count in items.most_common()]


def format_attribution(g: Generation) -> str:
  """`attribution` as a table."""
  rows = attribution(g)
  if not rows:
    return "attribution: no retrieved text conditioned this generation"
  width = max(len("document"), *(len(r["doc_id"]) for r in rows))
  lines = [f"{'document':<{width}}  items   share  chunks"]
  lines += [f"{r['doc_id']:<{width}}  {r['items']:>5}  {r['share']:>6.1%}  {r['chunks']:>6}"
            for r in rows]
  return "\n".join(lines)


def format_generation(g: Generation, snippet: int = 100) -> str:
  """The prompt and continuation, then per chunk the cited datastore text."""
  lines = [f"{g.prompt}{g.text}", "", f"[{g.model}: {len(g.token_ids)} tokens, "
           f"finished by {g.finish_reason}]"]
  for c in g.citations:
    text = " ".join(c.text.split())
    lines.append(f"tokens {c.start}-{c.end - 1}: \"{text[:snippet]}\"")
    if not c.neighbours:
      lines.append("  (no retrieved text conditioned these tokens)")
    for rank, n in enumerate(c.neighbours, 1):
      weight = "" if n.weight is None else f", weight {n.weight:.3f}"
      cited = " ".join(n.text.split())
      lines.append(f"  {rank}. {n.doc_id} @ token {n.position} (chunk {n.chunk}, "
                   f"distance {n.distance:.4f}{weight}): \"{cited[:snippet]}\"")
  return "\n".join(lines)
