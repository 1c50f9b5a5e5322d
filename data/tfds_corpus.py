"""TFDS corpora: `tfds:<name>[/<config>][:<version>][:<split>]` (see data/corpora.py).

    for doc in documents("tfds:pg19:validation"): ...

The dataset is read through `tfds.data_source` (array_record, no TensorFlow), prepared
into the TFDS data dir (`$TFDS_DATA_DIR` or ~/tensorflow_datasets) when needed; the text is
the first feature of TEXT_FEATURES that the dataset has.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from common.errors import UserError
from data.corpora import Document, decode_utf8

TEXT_FEATURES = ("text", "content", "article", "book_text", "document", "body", "passage",
                 "context", "story")
_TFDS_LEGACY_MODULES = ("text", "summarization", "question_answering")
_TFDS_SPEC = re.compile(r"^(?P<name>[^:\[\]]+?)(?::(?P<version>\d+\.\d+\.\d+))?"
                        r"(?::(?P<split>.+))?$")


def documents(spec: str, max_documents: int = 0) -> Iterator[Document]:
  """The documents of `tfds:<name>[/<config>][:<version>][:<split>]`, one record at a time
  (the first max_documents if > 0)."""
  match = _TFDS_SPEC.match(spec.removeprefix("tfds:"))
  if not match:
    raise UserError(f"corpus {spec!r} is not of the form tfds:<name>[/<config>][:<version>]"
                    f"[:<split>], e.g. tfds:pg19:validation")
  name = match["name"] + (f":{match['version']}" if match["version"] else "")
  split = match["split"] or "train"
  builder_name = match["name"].split("/")[0]
  if builder_name not in tfds.list_builders(with_community_datasets=False):
    for module in _TFDS_LEGACY_MODULES:  # builders that tfds imports lazily
      importlib.import_module(f"tensorflow_datasets.{module}")
  try:
    builder = tfds.builder(name)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown TFDS dataset {match['name']!r} in corpus {spec!r}; see "
                    f"https://www.tensorflow.org/datasets/catalog") from None
  features = builder.info.features
  field = next((f for f in TEXT_FEATURES if f in features), None)
  if field is None:
    raise UserError(f"TFDS dataset {name!r} has no text feature among {list(features)}; "
                    f"known text fields: {', '.join(TEXT_FEATURES)}")
  try:
    source = tfds.data_source(name, split=split)
  except Exception as e:  # download/prepare failures: network, disk, unknown split
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"could not open TFDS {name!r} split {split!r} ({first}); check the "
                    f"split name, network access and $TFDS_DATA_DIR") from None
  count = min(len(source), max_documents) if max_documents else len(source)
  for i in tqdm(range(count), desc=f"reading tfds:{name}", unit="doc", leave=False,
                disable=count < 1000):
    text = source[i][field]
    if isinstance(text, bytes):
      text = decode_utf8(text, Path(f"tfds:{name}:{split}[{i}]"))
    yield Document(f"{match['name']}/{split}/{i}", text)
