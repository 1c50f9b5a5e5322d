"""Editing a datastore without retraining: remove documents (an opt-out) and add new ones.

    python -m retrieval.edit --config retro_small --list                  # its documents
    python -m retrieval.edit --config retro_small --remove 'milton/*' --add my_corpus
    python -m retrieval.edit --config retro_small --remove @opt_out.txt   # one id/glob a line
    python train.py --config retro_small --config.retrieval.datastore=<the version printed>

    version = edit_datastore(config, prepared, remove=["milton/*"], add="my_corpus")

Editable datastores are packed chunk-aligned (datastore.py, format packed-v2: each
document padded to whole chunks, so its chunks are its own); the training split itself is
edited as `split:train`, its documents packed that way. An edit writes a new version, a
committed directory `cache_root/datastores/<fingerprint of parent and edit>/` whose
manifest records its content hash (`version`), its parent and the log of edits since the
first version, beside `parent_chunk.npy` (where each chunk came from). The old version
stays usable until deleted.

The model-facing artifacts of a version are built on first use (build.py) from its
parent's: the kept chunks' embeddings are copied and only the added ones embedded, a
trained (IVF) index is refilled rather than retrained, and the RETRO neighbour and REALM
candidate rows are copied except those the edit can change, which are searched again
(patch.py). With a Flat index everything then equals a fresh build of the edited corpus.
The kNN-LM datastore, which holds a trained LM's keys of the training split, is edited by
`knn_datastore.without` (eval.py --without).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np

from common import artifacts
from common import cli
from common.errors import UserError, cli_main
from data import corpora, dataset
from data import tokenizer as tokenizer_lib
from retrieval import build
from retrieval import datastore as datastore_lib

BLOCK_CHUNKS = 1 << 20  # chunks copied per block (memory stays bounded)


def read_patterns(items: Sequence[str]) -> list[str]:
  """Document ids or globs; `@path` reads one per line from a file (# starts a comment)."""
  out = []
  for item in items:
    if item.startswith("@"):
      path = Path(item[1:])
      if not path.is_file():
        raise UserError(f"{item}: no such file of document ids")
      lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
      out.extend(line for line in lines if line)
    else:
      out.append(item)
  return out


def match_documents(doc_ids: Sequence[str], patterns: Sequence[str]) -> list[int]:
  """Indices of the documents whose id equals or matches (fnmatch glob) a pattern; a
  pattern that matches nothing is a UserError (a typo must not pass as an opt-out)."""
  ids = list(doc_ids)
  chosen: set[int] = set()
  for pattern in patterns:
    hits = [i for i, doc_id in enumerate(ids) if doc_id == pattern
            or fnmatch.fnmatchcase(doc_id, pattern)]
    if not hits:
      sample = ", ".join(ids[:3])
      raise UserError(f"{pattern!r} matches no document of the datastore ({len(ids)} "
                      f"documents, e.g. {sample}); list them with --list")
    chosen.update(hits)
  return sorted(chosen)


def parent_spec(config: ml_collections.ConfigDict) -> str:
  """The datastore an edit starts from by default: the config's, or the training split's
  documents (`split:train`) when the config retrieves from the training split."""
  return config.retrieval.datastore or datastore_lib.TRAIN_DOCUMENTS


def edit_datastore(config: ml_collections.ConfigDict, prepared: dataset.Prepared,
                   remove: Sequence[str] = (), add: str | None = None,
                   parent: str | None = None) -> datastore_lib.Datastore:
  """The version of datastore `parent` (default `parent_spec`) without the documents
  matching `remove` (ids or globs) and with corpus `add` appended; built once, cached."""
  store = datastore_lib.load_datastore(config, prepared, parent or parent_spec(config))
  if not datastore_lib.is_editable(store):
    raise UserError(f"datastore {store.directory or 'train split'} is not packed by document "
                    f"(an older format); delete it and rerun to rebuild it, or edit "
                    f"{datastore_lib.TRAIN_DOCUMENTS!r}")
  split = store.split
  removed = match_documents(split.doc_ids, read_patterns(remove))
  added, added_hash = (corpora.scan(add, config.data.cache_dir) if add else (None, None))
  if not removed and not add:
    raise UserError("nothing to edit: give --remove IDS/GLOBS and/or --add CORPUS")
  if len(removed) == len(split.doc_ids) and not add:
    raise UserError("that removes every document; a datastore cannot be empty")
  gone = set(removed)
  kept_ids = [d for i, d in enumerate(split.doc_ids) if i not in gone]
  if added is not None:
    clash = sorted(set(kept_ids) & set(added.doc_ids))
    if clash or len(set(added.doc_ids)) < len(added.doc_ids):
      raise UserError(f"corpus {add!r} has documents already in the datastore (or twice): "
                      f"{', '.join(clash[:5]) or 'duplicate ids'}; remove them first")
  m = split.chunk_size
  tok = prepared.tokenizer
  removed_ids = [split.doc_ids[i] for i in removed]
  inputs = {"tokenizer": tok.hash, "parent": store.hash}
  final = artifacts.cache_root(config.data.cache_dir) / "datastores" / artifacts.fingerprint(
      {**inputs, "removed": removed_ids, "added": added_hash, "chunk_size": m})
  if artifacts.read_manifest(final) is None:
    with artifacts.building(final) as work:
      counts = _write_version(split, removed, added, tok, work)
      edit = {"removed": removed_ids, "added": add, "added_documents": len(added or ()),
              "added_hash": added_hash}
      spec = " ".join(filter(None, (store.spec, f"- {len(removed)} documents" if removed else "",
                                    f"+ {add}" if add else "")))
      datastore_lib.write_datastore_manifest(work, inputs, spec, m,
                                             parent=str(store.directory),
                                             edits=[*store.edits, edit], **counts)
  return datastore_lib.load_datastore(config, prepared, str(final))


def _write_version(split: dataset.TokenSplit, removed: Sequence[int],
                   added: corpora.Stream | None, tok: tokenizer_lib.Tokenizer,
                   work: Path) -> dict[str, int]:
  """The edited datastore's streams and `parent_chunk.npy` in `work`: the kept documents'
  chunks in order, then the added corpus packed the same way."""
  m = split.chunk_size
  keep_D = np.ones(len(split.doc_ids), bool)
  keep_D[list(removed)] = False
  new_doc_D = np.cumsum(keep_D) - 1
  chunk_doc_P = np.asarray(split.chunk_doc())
  kept_P = np.flatnonzero(keep_D[chunk_doc_P])
  extra = {}
  if added is not None:
    dataset.pack(added, tok, work, "added", align=m)
    extra = {name: np.load(work / f"added.{name}.npy", mmap_mode="r")
             for name in ("tokens", "token_doc")}
  n_added = len(extra["tokens"]) // m if extra else 0
  n = len(kept_P) + n_added
  tokens = np.lib.format.open_memmap(work / "datastore.tokens.npy", "w+", np.int32, (n * m,))
  token_doc = np.lib.format.open_memmap(work / "datastore.token_doc.npy", "w+", np.int32,
                                        (n * m,))
  chunks_Pxm = split.chunk_tokens()
  docs_Pxm = np.asarray(split.token_doc)[:split.num_chunks * m].reshape(-1, m)
  for b in range(0, len(kept_P), BLOCK_CHUNKS):
    rows = kept_P[b:b + BLOCK_CHUNKS]
    tokens[b * m:(b + len(rows)) * m] = np.asarray(chunks_Pxm[rows]).reshape(-1)
    token_doc[b * m:(b + len(rows)) * m] = new_doc_D[np.asarray(docs_Pxm[rows])].reshape(-1)
  doc_ids = [d for d, keep in zip(split.doc_ids, keep_D) if keep]
  if extra:
    tokens[len(kept_P) * m:] = extra["tokens"]
    token_doc[len(kept_P) * m:] = np.asarray(extra["token_doc"]) + len(doc_ids)
    doc_ids += json.loads((work / "added.doc_ids.json").read_text())
    for name in ("added.tokens.npy", "added.token_doc.npy", "added.doc_ids.json"):
      (work / name).unlink()
  tokens.flush()
  token_doc.flush()
  del tokens, token_doc
  artifacts.atomic_write_text(work / "datastore.doc_ids.json", json.dumps(doc_ids))
  artifacts.atomic_save_npy(work / datastore_lib.PARENT_CHUNKS,
                            np.concatenate([kept_P, np.full(n_added, -1)]).astype(np.int64))
  return {"documents": len(doc_ids), "tokens": n * m}


def document_table(store: datastore_lib.Datastore) -> str:
  """One line per document of the datastore: its id and chunk count."""
  counts_D = np.bincount(np.asarray(store.split.chunk_doc()), minlength=len(store.split.doc_ids))
  width = max(len(d) for d in store.split.doc_ids)
  return "\n".join(f"{doc_id:<{width}}  {int(c)} chunks"
                   for doc_id, c in zip(store.split.doc_ids, counts_D))


@cli_main
def main(argv: Sequence[str] | None = None) -> datastore_lib.Datastore | None:
  p = cli.parser("Remove documents from (or add documents to) a datastore, without "
                 "retraining: writes a new datastore version and its retrieval arrays.")
  p.add_argument("--datastore", default=None,
                 help="the version to edit (default: the config's retrieval.datastore, or "
                      "split:train for a config that retrieves from its training split)")
  p.add_argument("--remove", action="append", default=[],
                 help="a document id or glob (fnmatch), or @FILE of them; repeatable")
  p.add_argument("--add", default=None, help="a corpus spec whose documents are appended")
  p.add_argument("--list", action="store_true", help="list the datastore's documents and stop")
  args, config = cli.parse(p, argv)
  prepared = dataset.prepare(config)
  if args.list:
    store = datastore_lib.load_datastore(config, prepared, args.datastore or parent_spec(config))
    print(document_table(store))
    return None
  version = edit_datastore(config, prepared, args.remove, args.add, args.datastore)
  print(f"datastore version {version.hash} ({version.spec}): {version.directory}")
  config.retrieval.datastore = str(version.directory)
  print(build.summary(build.build_all(config)))
  print(f"train or evaluate with it: --config.retrieval.datastore={version.directory}")
  return version


if __name__ == "__main__":
  main(sys.argv[1:])
