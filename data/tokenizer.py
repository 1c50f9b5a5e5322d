"""The LM tokenizer: a byte-level BPE trained on the training split, or any HF tokenizer.

    tok = get_tokenizer("bpe", splits["train"], vocab_size=8192)   # trained once, cached
    tok = Tokenizer.load("path/to/folder")                        # or a hub name ("gpt2")
    ids = tok.encode("To be, or not to be"); tok.decode(ids)

Token id 0 is padding in every table. Our BPE puts `<pad>` at 0 and `<eos>` at 1. An
external tokenizer whose padding id is not 0 (or that has none, like gpt2) has all its ids
shifted by +1 inside the wrapper, so its vocabulary grows by one and id 0 stays free for
padding. Special-token strings inside the text ("<eos>") are encoded as plain text.
Tokenizers are saved as transformers folders (`save_pretrained`) and loaded with
`AutoTokenizer.from_pretrained`, which works offline (HF_HUB_OFFLINE=1) for folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from common import artifacts
from common.errors import UserError
from data import corpora

PAD, EOS = "<pad>", "<eos>"
_BPE_VERSION = "bytelevel-bpe-v1"  # bump when training changes, to invalidate caches


class Tokenizer:
  """Wraps a transformers fast tokenizer; ids shifted so that 0 is padding."""

  def __init__(self, hf_tokenizer, path: str):
    self.hf = hf_tokenizer
    self.path = path
    self._backend = hf_tokenizer.backend_tokenizer
    self._backend.encode_special_tokens = True  # "<eos>" in text is text, not a token
    self.shift = 0 if hf_tokenizer.pad_token_id == 0 else 1
    eos = hf_tokenizer.eos_token_id
    if eos is None:
      eos = hf_tokenizer.sep_token_id
    if eos is None:
      raise UserError(f"tokenizer {path!r} has neither an eos nor a sep token; use "
                      f"--config.data.tokenizer=bpe or a tokenizer that has one")
    self.eos_id = eos + self.shift
    self.pad_id = 0
    self.vocab_size = len(hf_tokenizer) + self.shift
    self.hash = artifacts.fingerprint({"tokenizer": self._backend.to_str(),
                                       "shift": self.shift, "eos": self.eos_id})

  @classmethod
  def load(cls, name_or_path: str) -> Tokenizer:
    """A tokenizer folder, or a hub name (needs the hub or its local HF cache)."""
    from transformers import AutoTokenizer  # slow import: only when loading

    path = Path(name_or_path).expanduser()
    if path.is_dir():
      name_or_path = str(path)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
      raise UserError(f"tokenizer folder {name_or_path!r} does not exist; set "
                      f"--config.data.tokenizer=bpe or to a folder with tokenizer.json")
    try:
      hf = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"cannot load tokenizer {name_or_path!r} ({first}); offline, use a "
                      f"local folder or --config.data.tokenizer=bpe") from None
    if not hf.is_fast:
      raise UserError(f"tokenizer {name_or_path!r} has no fast (tokenizers) version; use "
                      f"--config.data.tokenizer=bpe or a folder with tokenizer.json")
    return cls(hf, name_or_path)

  def encode(self, text: str) -> list[int]:
    return self._shifted(self._backend.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts at once (parallel in the Rust tokenizer)."""
    encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
    return [self._shifted(e.ids) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; padding (0) is dropped, other special tokens are kept."""
    ids = [int(i) - self.shift for i in ids if int(i) != 0]
    return self._backend.decode(ids, skip_special_tokens=False)

  def _shifted(self, ids: list[int]) -> list[int]:
    return [i + self.shift for i in ids] if self.shift else ids

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"shift={self.shift})")


def train_bpe(docs: Sequence[corpora.Document], vocab_size: int, out_dir: str | os.PathLike
              ) -> None:
  """Trains a byte-level BPE (<pad>=0, <eos>=1) on `docs`; saves a transformers folder."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=True)
  raw.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=PAD, eos_token=EOS)
  hf.save_pretrained(str(out_dir))


def get_tokenizer(spec: str, train_docs: Sequence[corpora.Document], vocab_size: int,
                  cache_dir: str = "", rebuild: str = "") -> Tokenizer:
  """`data.tokenizer`: "bpe" (trained on `train_docs`, cached) or a hub name/folder.

  Raises UserError if the tokenizer needs more ids than `vocab_size` (model.vocab_size),
  or if a cached BPE's files are damaged (`rebuild`: the command that rebuilds it).
  """
  if spec == "bpe":
    train_hash = corpora.corpus_hash(train_docs)
    key = artifacts.fingerprint({"kind": _BPE_VERSION, "train": train_hash,
                                 "vocab_size": vocab_size})
    final = artifacts.cache_root(cache_dir) / "tokenizers" / f"bpe-{key}"
    if artifacts.read_manifest(final) is None:
      print(f"training a {vocab_size}-token byte-level BPE on {len(train_docs)} documents "
            f"-> {final}", flush=True)
      with artifacts.building(final) as work:
        train_bpe(train_docs, vocab_size, work)
        tok = Tokenizer.load(str(work))
        artifacts.write_manifest(work, "tokenizer", {"train_corpus": train_hash},
                                 vocab_size=tok.vocab_size, hash=tok.hash)
    else:
      print(f"reusing cached tokenizer {final}", flush=True)
    artifacts.check_files(final, rebuild=rebuild)
    tok = Tokenizer.load(str(final))
  else:
    tok = Tokenizer.load(spec)
  if tok.vocab_size > vocab_size:
    raise UserError(f"model.vocab_size={vocab_size} is smaller than the vocabulary of "
                    f"tokenizer {spec!r} ({tok.vocab_size} ids); set "
                    f"--config.model.vocab_size={tok.vocab_size}")
  return tok
