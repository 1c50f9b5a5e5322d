"""Generation: KV-cached decoding equals the full forward; RETRO retrieves while sampling
and cites real datastore chunks; kNN-LM and REALM sample their full distributions; seeds,
sampling filters and bad input. Models have random parameters (no training); generating
from a trained checkpoint, the CLI and the Colab notebook are in tests/test_notebook.py."""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import generate as gen
import inference
from inference import sampling, stores
import models
import synthetic
from common import artifacts
from common.errors import UserError
from models import knnlm
from models.layers import Spec
from models.realm import RealmReader
from models.transformer import Transformer
from data import dataset
from retrieval import core, datastore, neighbours
from retrieval import knn_datastore

M = 64  # chunk size of the tiny configs


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
  return synthetic.corpus_overrides(tmp_path_factory.mktemp("generate"), num_docs=6,
                                    words_per_doc=600, num_words=300, num_phrases=10)


@pytest.fixture(scope="module")
def tiny(overrides):
  """name -> (config on the synthetic corpus, random params), made once per name.

  Parameters are drawn from the abstract init (no init compilation), LeCun-normal
  matrices and unit-variance embeddings, so logits are far from uniform."""
  made = {}

  def get(name: str):
    if name not in made:
      config = configs.load(name, overrides)
      batch = {"inputs": jnp.ones((1, config.data.seq_len), jnp.int32)}
      batch.update(_extra_inputs(config))
      model = models.get_model(config.model)
      shapes = jax.eval_shape(lambda: nn.unbox(model.init(
          jax.random.PRNGKey(0), *models.model_inputs(config.model, batch))["params"]))
      rng = np.random.default_rng(len(made))

      def draw(path, leaf):
        if leaf.ndim <= 1:
          return jnp.ones(leaf.shape, jnp.float32)
        name = jax.tree_util.keystr(path)
        fan_in = np.prod(leaf.shape[:-1]) if "'out'" in name else leaf.shape[0]
        std = 1.0 if "embedding" in name else fan_in ** -0.5
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

      made[name] = config, jax.tree_util.tree_map_with_path(draw, shapes)
    return made[name]

  return get


def _extra_inputs(config) -> dict[str, jax.Array]:
  """Placeholder retrieval inputs of one sequence (RETRO neighbours, REALM candidates)."""
  mc, L = config.model, config.data.seq_len
  if mc.name == "retro":
    return {"neighbours": jnp.ones((1, L // M, mc.num_neighbours, mc.neighbour_len), jnp.int32)}
  if mc.name == "realm":
    K = mc.num_neighbours
    return {"candidates": jnp.ones((1, K, mc.chunk_size), jnp.int32),
            "candidate_embeddings": jnp.ones((1, K, mc.realm.embedding_dim)),
            "query_embedding": jnp.ones((1, mc.realm.embedding_dim))}
  return {}


def _decode(config, params, tokens_BxL, per_call, **kwargs):
  """Logits [B, L, V] from cached decoding, `per_call(pos)` tokens at a time."""
  decoder = models.get_decoder(config.model)
  cache = models.init_cache(config.model, *tokens_BxL.shape)
  step = jax.jit(lambda c, t, *a, **k: decoder.apply({"params": params, "cache": c}, t, *a,
                                                      decode=True, mutable=["cache"], **k))
  out, pos = [], 0
  while pos < tokens_BxL.shape[1]:
    n, args, kw = per_call(pos)
    logits, mutated = step(cache, tokens_BxL[:, pos:pos + n], *args, **kw)
    cache = mutated["cache"]
    out.append(logits)
    pos += n
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("name", ["tiny_retro", "tiny_knnlm", "tiny_realm"])
def test_cached_decoding_equals_full_forward(name, tiny):
  """Token by token (RETRO: neighbours arriving at each chunk's last token, across two
  chunk boundaries and into a third chunk), logits equal the full forward's to 1e-5."""
  config, params = tiny(name)
  B, L = 2, 2 * M + 20
  x_BxL = jax.random.randint(jax.random.PRNGKey(0), (B, L), 1, config.model.vocab_size)
  if name == "tiny_retro":
    nbr_BxCxKxR = jax.random.randint(jax.random.PRNGKey(1), (B, L // M, 2, 2 * M), 1,
                                     config.model.vocab_size)
    nbr_BxCxKxR = nbr_BxCxKxR.at[0, :, :, 90:].set(0).at[1, 1].set(0)  # padding, a chunk with none
    full = jax.jit(models.get_model(config.model).apply)({"params": params}, x_BxL, nbr_BxCxKxR)

    def per_call(pos):
      done = pos % M == M - 1 and pos // M < nbr_BxCxKxR.shape[1]
      return 1, (nbr_BxCxKxR[:, pos // M][:, None] if done else None,), {}
  else:  # a Transformer (REALM: its reader, on the same params), with masked keys as
    # REALM's padded documents
    valid_BxL = jnp.ones((B, L), bool).at[0, 5:40].set(False)
    full = jax.jit(models.get_decoder(config.model).apply)({"params": params}, x_BxL,
                                                           valid_BxL=valid_BxL)

    def per_call(pos):  # a 50-token prefill, then one token per call
      n = 50 if pos == 0 else 1
      return n, (), {"valid_BxL": valid_BxL[:, pos:pos + n]}
  cached = _decode(config, params, x_BxL, per_call)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)


def _log_softmax(logits_LxV) -> np.ndarray:
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits_LxV, jnp.float32)), np.float64)


def test_retro_retrieves_while_sampling_and_cites_the_datastore(tiny):
  """Two prompts (shorter and longer than a chunk), 130 tokens: every completed chunk's
  neighbours are its nearest datastore chunks; the sampled log-probs equal the full
  forward's with those neighbours; citations name real chunks with their text."""
  prompts = ["ka lo mi ren", "tu sa vo el dan " * 12]
  config, params = tiny("tiny_retro")
  gens = gen.generate((config, params), prompts, max_tokens=130, temperature=1.0, seed=3,
                      stop_at_eos=False)
  prepared = dataset.prepare(config)
  tok = prepared.tokenizer
  chunks = stores.chunk_store(config)
  store = chunks.store.split
  chunk_doc = np.asarray(store.chunk_doc())
  model = models.get_model(config.model)
  K, R = config.model.num_neighbours, config.model.neighbour_len
  seqs = [np.array(g.prompt_ids + g.token_ids, np.int32) for g in gens]
  T = max(len(seq) for seq in seqs)
  C = T // M
  ids_BxCxK = np.stack([np.concatenate([chunks.search(seq[None, c * M:(c + 1) * M], K)[0]
                                        for c in range(C)]) for seq in seqs])
  seqs_BxT = np.stack([np.pad(seq, (0, T - len(seq))) for seq in seqs])  # (causal: harmless)
  query_BxCxM = seqs_BxT[:, :C * M].reshape(-1, C, M)  # neighbours start aligned with these
  nbr_BxCxKxR = core.chunk_windows(store.tokens, store.token_doc, ids_BxCxK.reshape(-1, K), M,
                                   R, query_BxCxM.reshape(-1, M)).reshape(-1, C, K, R)
  logits_BxTxV = jax.jit(model.apply)({"params": params}, seqs_BxT, nbr_BxCxKxR)
  cited_chunks = 0
  for g, seq, ids_CxK, nbr_CxKxR, logits_TxV in zip(gens, seqs, ids_BxCxK, nbr_BxCxKxR,
                                                     logits_BxTxV):
    assert g.finish_reason == "length" and len(g.token_ids) == 130
    P = len(g.prompt_ids)
    assert g.prompt_ids == tok.encode(g.prompt) and g.text == tok.decode(g.token_ids)
    logp_L = _log_softmax(logits_TxV)[np.arange(P - 1, len(seq) - 1), seq[P:]]
    np.testing.assert_allclose(g.token_logprobs, logp_L, atol=1e-5, rtol=0)
    assert sum(c.end - c.start for c in g.citations) == len(g.token_ids)
    for c in g.citations:
      j = (P + c.start) // M  # sequence chunk of these tokens: conditioned by chunk j-1
      assert (P + c.end - 1) // M == j
      assert c.text == tok.decode(g.token_ids[c.start:c.end])
      assert [n.chunk for n in c.neighbours] == (list(ids_CxK[j - 1]) if j else [])
      for n, window in zip(c.neighbours, nbr_CxKxR[j - 1] if j else []):
        doc = chunk_doc[n.chunk]
        assert n.doc_id == store.doc_ids[doc]
        assert n.position == n.chunk * M - np.searchsorted(store.token_doc, doc)
        assert n.text == tok.decode(window.tolist())  # the aligned window the model read
        cited_chunks += 1
  assert gens[0].citations[0].neighbours == []  # a short prompt starts without neighbours
  assert cited_chunks >= 3 * K


def test_incontext_reads_documents_retrieved_every_stride_tokens(tiny, overrides):
  """In-Context RALM sampling (K=2, stride 32, queries of 64 tokens): every block reads the
  documents its last 64 tokens retrieve; the cached log-probs equal the full forward's
  with those documents; a block's citations are them; without retrieval it is the decoder."""
  _, params = tiny("tiny_incontext")
  config = configs.load("tiny_incontext", [*overrides, "model.incontext.stride=32"])
  S, q = 32, config.model.incontext.query_len
  K, R = config.model.num_neighbours, config.model.neighbour_len
  prompts = ["ka lo mi ren", "tu sa vo el dan " * 12]
  gens = gen.generate((config, params), prompts, max_tokens=100, seed=5, stop_at_eos=False)
  chunks = stores.chunk_store(config)
  store = chunks.store.split
  seqs = [np.array(g.prompt_ids + g.token_ids, np.int32) for g in gens]
  T = -(-max(len(seq) for seq in seqs) // S) * S
  ids_BxWxK = np.stack([np.concatenate([chunks.search(seq[None, max(0, (i + 1) * S - q):
                                                          (i + 1) * S], K)[0]
                                        for i in range(T // S)]) for seq in seqs])
  seqs_BxT = np.stack([np.pad(seq, (0, T - len(seq))) for seq in seqs])  # (causal: harmless)
  end_W = np.arange(1, T // S + 1) * S  # the query windows, whose last M tokens align
  query_BxWxM = np.stack([neighbours.query_tokens(seq, np.maximum(end_W - q, 0), end_W, M)
                          for seq in seqs_BxT])
  nbr_BxWxKxR = core.chunk_windows(store.tokens, store.token_doc, ids_BxWxK.reshape(-1, K), M,
                                   R, query_BxWxM.reshape(-1, M)).reshape(*ids_BxWxK.shape, R)
  model = models.get_model(config.model)
  logp_BxTxV = np.asarray(jax.jit(model.apply)({"params": params}, seqs_BxT, nbr_BxWxKxR))
  for g, seq, ids_WxK, logp_TxV in zip(gens, seqs, ids_BxWxK, logp_BxTxV):
    P = len(g.prompt_ids)
    want = logp_TxV[np.arange(P - 1, len(seq) - 1), seq[P:]]
    np.testing.assert_allclose(g.token_logprobs, want, atol=1e-4, rtol=0)
    for c in g.citations:
      block = (P + c.start) // S
      assert [n.chunk for n in c.neighbours] == (list(ids_WxK[block - 1]) if block else [])
  plain, = gen.generate((config, params), prompts[:1], max_tokens=40, seed=5,
                        retrieval=False, stop_at_eos=False)
  decoder = Transformer(Spec.from_config(config.model))
  seq = np.array(plain.prompt_ids + plain.token_ids, np.int32)
  logits_TxV = jax.jit(decoder.apply)({"params": params}, seq[None])[0]
  P = len(plain.prompt_ids)
  np.testing.assert_allclose(plain.token_logprobs,
                             _log_softmax(logits_TxV)[np.arange(P - 1, len(seq) - 1), seq[P:]],
                             atol=1e-5, rtol=0)
  assert all(c.neighbours == [] for c in plain.citations)


def test_sampling_is_deterministic_for_a_seed(tiny):
  source = tiny("tiny_retro")
  prompts = ["ka lo mi", "dan qui po"]
  run = lambda seed: gen.generate(source, prompts, max_tokens=70, seed=seed,  # noqa: E731
                                  top_k=20, top_p=0.9, stop_at_eos=False)
  first, again, other = run(7), run(7), run(8)
  assert [g.token_ids for g in first] == [g.token_ids for g in again]
  assert [g.citations for g in first] == [g.citations for g in again]
  assert any(c.neighbours for c in first[0].citations)
  assert [g.token_ids for g in first] != [g.token_ids for g in other]
  plain, = gen.generate(source, prompts[:1], max_tokens=70, seed=7, retrieval=False)
  assert all(c.neighbours == [] for c in plain.citations)


def test_without_a_document_nothing_of_it_is_cited(tiny):
  """An opt-out at generation time (RETRO's chunks, kNN-LM's entries): the removed document
  is never cited; the attribution table accounts for every cited item."""
  prompts = ["ka lo mi", "dan qui po"]
  source = tiny("tiny_retro")
  full = gen.generate(source, prompts, max_tokens=70, seed=7, stop_at_eos=False)
  cited = lambda gens: [n.doc_id for g in gens for c in g.citations  # noqa: E731
                        for n in c.neighbours]
  table = inference.attribution(full[0])
  assert sum(r["items"] for r in table) == len(cited(full[:1]))
  assert sum(r["share"] for r in table) == pytest.approx(1.0)
  gone = table[0]["doc_id"]
  assert gone in inference.format_attribution(full[0])
  edited = gen.generate(source, prompts, max_tokens=70, seed=7, stop_at_eos=False,
                        without=[gone])
  assert cited(edited) and gone not in cited(edited)
  config, params = tiny("tiny_knnlm")
  knn = {"k": 4, "lam": 0.5, "temperature": 2.0}
  run = lambda **kw: gen.generate((config, params), prompts, max_tokens=40, seed=0,  # noqa: E731
                                  knn=knn, stop_at_eos=False, **kw)
  gone = inference.attribution(run()[0])[0]["doc_id"]
  edited = run(without=[gone])
  assert cited(edited) and gone not in cited(edited)


def test_sample_filters():
  logp_1xV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jnp.stack([jax.random.key(0)])
  draw = lambda sampler: {int(sampling.sample(logp_1xV, keys, pos, sampler)[0])  # noqa: E731
                          for pos in range(200)}
  assert draw(sampling.Sampler(temperature=0.0)) == {0}
  assert draw(sampling.Sampler(top_k=1)) == {0}
  assert draw(sampling.Sampler(top_k=2)) == {0, 1}
  assert draw(sampling.Sampler(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert draw(sampling.Sampler(top_p=0.5)) == {0}
  assert draw(sampling.Sampler()) == {0, 1, 2, 3}


def test_knnlm_samples_the_interpolated_distribution(tiny):
  config, params = tiny("tiny_knnlm")
  settings = {"k": 4, "lam": 0.5, "temperature": 2.0}
  g, = gen.generate((config, params), ["ka lo mi ren tu"], max_tokens=70, seed=0, knn=settings,
                    stop_at_eos=False)
  prepared = dataset.prepare(config)
  tok, split = prepared.tokenizer, prepared.train
  directory, = [d for d in (Path(config.data.cache_dir) / knn_datastore.ARTIFACT).glob("*")
                if "removed" not in artifacts.read_manifest(d)]  # not an opt-out's copy
  store = knn_datastore.KnnDatastore.load(directory, {}, "")
  seq = np.array(g.prompt_ids + g.token_ids, np.int32)
  P = len(g.prompt_ids)
  logits_LxV, keys_LxD = jax.jit(functools.partial(
      models.get_model(config.model).apply, return_key=True))({"params": params}, seq[None])
  d_LxK, t_LxK = store.search(np.asarray(keys_LxD[0]), 4)
  knn_LxV = knnlm.knn_log_probs(d_LxK[None], t_LxK[None], config.model.vocab_size, 2.0)[0]
  mixed_LxV = knnlm.interpolate(jax.nn.log_softmax(logits_LxV[0]), knn_LxV, 0.5)
  want = np.asarray(mixed_LxV)[np.arange(P - 1, len(seq) - 1), seq[P:]]
  np.testing.assert_allclose(g.token_logprobs, want, atol=1e-4, rtol=0)
  assert any(c.neighbours for c in g.citations)
  for c in g.citations:
    assert len(c.neighbours) <= knnlm.CITATIONS
    for n in c.neighbours:  # the entry's next token is one this chunk sampled
      doc = split.doc_ids.index(n.doc_id)
      q = int(np.searchsorted(split.token_doc, doc)) + n.position
      assert split.token_doc[q] == doc and n.chunk == q // M
      assert int(split.tokens[q]) in g.token_ids[c.start:c.end]
      assert n.text == tok.decode(split.tokens[max(q - stores.KNN_CONTEXT, q - n.position):q + 1]
                                  .tolist())
      assert 0 < n.weight <= 0.5 * (c.end - c.start) + 1e-6


def test_realm_samples_the_marginal_over_candidates(tiny):
  """log p(y_t) = logsumexp_z(log p(z|x) + sum_{query<s<=t} log p(y_s|z)) - (same to t-1),
  from the full forward of the reader over the cited candidates and the null document."""
  config, params = tiny("tiny_realm")
  params = {**params, "null_embedding": params["null_embedding"] * 0.05}  # O(1) logits
  prompt = "ka lo mi ren tu sa vo el dan " * 8  # longer than the query chunk
  g, = gen.generate((config, params), [prompt], max_tokens=40, seed=1, k=3,
                    stop_at_eos=False)
  prepared = dataset.prepare(config)
  store = datastore.load_datastore(config, prepared).split
  ids_1xK = np.array([[n.chunk for n in g.citations[0].neighbours]])
  assert ids_1xK.shape == (1, 3)
  cand_1xKxM = core.chunk_windows(store.tokens, store.token_doc, ids_1xK, M, M)
  emb_1xKxE = np.asarray(stores.chunk_store(config).embeddings_NxE[ids_1xK])  # the index's
  seq = np.array(g.prompt_ids + g.token_ids, np.int32)
  query_1xE = stores.chunk_store(config).embed(seq[None, :M])
  P = len(g.prompt_ids)
  model = models.get_model(config.model)
  scores_1xZ = jax.jit(functools.partial(model.apply, method=RealmReader.retrieval_logits))(
      {"params": params}, seq[None, :M], cand_1xKxM, emb_1xKxE, query_1xE)
  assert 0.05 < np.exp(_log_softmax(scores_1xZ)).max() < 0.95  # the prior is not one-hot
  _, logits_1xZxLxV = jax.jit(model.apply)({"params": params}, seq[None], cand_1xKxM, emb_1xKxE,
                                           query_1xE)
  logp_ZxL = np.stack([_log_softmax(z)[np.arange(len(seq) - 1), seq[1:]]
                       for z in logits_1xZxLxV[0]])  # log p(seq[t+1] | z)
  log_prior_Z = _log_softmax(scores_1xZ)[0]
  cum_ZxL = log_prior_Z[:, None] + np.cumsum(np.where(np.arange(1, len(seq)) >= M, logp_ZxL, 0),
                                             axis=1)
  evidence_L = np.logaddexp.reduce(cum_ZxL, axis=0)  # log p(seq[1..t+1] after the query)
  want = evidence_L[P - 1:] - evidence_L[P - 2:-1]
  np.testing.assert_allclose(g.token_logprobs, want, atol=1e-4, rtol=0)
  last = P + g.citations[-1].end - 2  # the chunk's last token is seq[last + 1]
  post_Z = np.exp(cum_ZxL[:, last] - evidence_L[last])
  np.testing.assert_allclose([n.weight for n in g.citations[-1].neighbours], post_Z[1:],
                             atol=1e-5)


def test_bad_input_is_one_line(tiny, tmp_path, capsys):
  source = tiny("tiny_retro")
  for kwargs, words in [({"temperature": -1.0}, "temperature=-1.0"),
                        ({"top_p": 0.0}, "top_p=0.0"),
                        ({"top_k": 10_000}, "top_k=10000"),
                        ({"max_tokens": 0}, "max_tokens=0"),
                        ({"knn": True}, "kNN-LM sampling needs a decoder LM")]:
    with pytest.raises(UserError, match=words):
      gen.generate(source, ["ka"], **kwargs)
  with pytest.raises(UserError, match="non-empty list"):
    gen.generate(source, "ka")
  with pytest.raises(SystemExit) as exit_info:
    gen.main(["--workdir", str(tmp_path), "--prompt", "ka"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no checkpoints in") and len(err.strip().splitlines()) == 1
