"""Tokenizer: BPE training and cache, offline reload, padding at 0, id shift, vocab checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from data import tokenizer as tokenizer_lib
from data.corpora import Document

TEXTS = ["To be, or not to be: that is the question.\n",
         "Whether 'tis nobler in the mind to suffer\nthe slings and arrows of outrageous fortune",
         "Ünïcödé, emoji 🙂, tabs\tand  double  spaces, and a literal <eos> or <pad>."]
DOCS = [Document(f"d{i}", t * 20) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.get_tokenizer("bpe", DOCS, 320, str(tmp_path_factory.mktemp("cache")))


def _external(folder: Path, specials: list[str], **tokens: str) -> Path:
  """A transformers tokenizer folder with the given special tokens first in its vocab."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=raw, **tokens).save_pretrained(str(folder))
  return folder


def test_bpe_layout_and_round_trip(bpe):
  assert (bpe.pad_id, bpe.eos_id, bpe.vocab_size) == (0, 1, 320)
  for text in TEXTS:
    ids = bpe.encode(text)
    assert 0 not in ids and 1 not in ids  # "<eos>"/"<pad>" in text stay text
    assert bpe.decode(ids) == text
    assert bpe.decode([0, 0] + ids + [0]) == text  # padding is dropped
  assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]
  assert bpe.decode(bpe.encode("a") + [bpe.eos_id]) == "a<eos>"


def test_bpe_is_cached_by_train_docs_and_vocab(bpe, capsys):
  cache = str(Path(bpe.path).parent.parent)
  mtime = (Path(bpe.path) / "tokenizer.json").stat().st_mtime_ns
  again = tokenizer_lib.get_tokenizer("bpe", DOCS, 320, cache)
  assert "reusing cached tokenizer" in capsys.readouterr().out
  assert again.hash == bpe.hash and again.path == bpe.path
  assert (Path(bpe.path) / "tokenizer.json").stat().st_mtime_ns == mtime
  other = tokenizer_lib.get_tokenizer("bpe", DOCS[:2], 320, cache)
  assert other.path != bpe.path


def test_offline_reload_in_a_new_process(bpe):
  code = ("import json, sys; from data.tokenizer import Tokenizer; "
          "t = Tokenizer.load(sys.argv[1]); ids = t.encode(sys.argv[2]); "
          "print(json.dumps([ids, t.decode(ids), t.hash]))")
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-c", code, bpe.path, TEXTS[2]], env=env,
                       capture_output=True, text=True, check=True).stdout
  ids, text, digest = json.loads(out.strip().splitlines()[-1])
  assert ids == bpe.encode(TEXTS[2]) and text == TEXTS[2] and digest == bpe.hash


def test_external_pad_not_zero_is_shifted(tmp_path):
  folder = _external(tmp_path / "ext", ["<s>", "</s>", "<pad>"], eos_token="</s>",
                     pad_token="<pad>")
  tok = tokenizer_lib.Tokenizer.load(str(folder))
  assert (tok.shift, tok.pad_id, tok.eos_id, tok.vocab_size) == (1, 0, 2, 301)
  ids = tok.encode(TEXTS[0])
  assert min(ids) >= 1 and ids == [i + 1 for i in tok.hf(TEXTS[0])["input_ids"]]
  assert tok.decode([0] + ids) == TEXTS[0]


def test_external_without_pad_gets_one(tmp_path):
  folder = _external(tmp_path / "nopad", ["<|endoftext|>"], eos_token="<|endoftext|>")
  tok = tokenizer_lib.Tokenizer.load(str(folder))
  assert (tok.shift, tok.eos_id, tok.vocab_size) == (1, 1, 301)
  assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_external_pad_zero_is_kept(tmp_path):
  folder = _external(tmp_path / "pad0", ["[PAD]", "[SEP]"], pad_token="[PAD]",
                     sep_token="[SEP]")
  tok = tokenizer_lib.Tokenizer.load(str(folder))
  assert (tok.shift, tok.eos_id, tok.vocab_size) == (0, 1, 300)  # sep serves as eos


def test_vocab_too_small_names_both_numbers_and_the_fix(tmp_path):
  with pytest.raises(UserError, match=r"model.vocab_size=100 .* \(258 ids\).*"
                                      r"--config.model.vocab_size=258"):
    tokenizer_lib.get_tokenizer("bpe", DOCS, 100, str(tmp_path))
  folder = _external(tmp_path / "ext", ["<pad>", "<eos>"], eos_token="<eos>", pad_token="<pad>")
  with pytest.raises(UserError, match=r"model.vocab_size=256 .*--config.model.vocab_size=300"):
    tokenizer_lib.get_tokenizer(str(folder), DOCS, 256)


def test_missing_folder_and_unreachable_hub_name(tmp_path):
  with pytest.raises(UserError, match="tokenizer folder .* does not exist"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "no" / "such"))
  assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no network here
  with pytest.raises(UserError, match="cannot load tokenizer 'surely-not/a-tokenizer-x9'"):
    tokenizer_lib.Tokenizer.load("surely-not/a-tokenizer-x9")
