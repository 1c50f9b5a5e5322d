"""Run bundles: one checkpoint plus everything evaluation and generation read, in one folder.

    python -m training.export --workdir runs/retro_small --out bundles/retro_small
    config, params = train.load_checkpoint("hf://org/retro-small")   # or a folder, gs://...

Layout (`training.export` writes it; the folder is also a workdir, so every reader of a
workdir reads a bundle):

    manifest.json          kind "bundle": step, model, source, the config fields that point
                           into the bundle (`paths`), artifacts, and every file's size and
                           sha256 (checked on load like any artifact's: sizes always,
                           checksums under `--verify`)
    config.json            the run's resolved config, as trained
    checkpoints/<step>/    the orbax checkpoint (train state and metadata)
    tokenizer/             the LM tokenizer (a transformers folder)
    embedder/              the chunk embedder's weights and tokenizer (families that retrieve)
    cache/<kind>/<key>/    the cached artifacts the run reads (dataset, datastore, chunk
                           embeddings, FAISS index, neighbours or candidates, kNN-LM
                           datastore), each with its manifest, as under $RETROZOO_CACHE
    metrics.jsonl          the training curve (when the workdir has one)

`load_config` gives the run's config with `data.corpus` (the packed dataset),
`data.tokenizer`, `data.cache_dir`, `retrieval.embedder` and `retrieval.datastore` pointing
into the bundle: its artifacts are found by their content hashes as in any cache, and
nothing is rebuilt. What it does not hold (another datastore, say) is built into its cache.

`local(source)` turns a source into a local folder: a path as it is; `gs://...` (any
`etils.epath` URL) is copied once into `<cache>/bundles/<hash of the URL>/`;
`hf://org/name[@revision]`, or a bare `org/name` that is not a local path, comes through
`huggingface_hub.snapshot_download` (honours `HF_HUB_CACHE` and `HF_HUB_OFFLINE`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import ml_collections

import configs
from common import artifacts
from common.errors import UserError

KIND = "bundle"  # the kind in the bundle's manifest.json
CONFIG = "config.json"
_HUB_ID = re.compile(r"^(hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_bundle(directory: str | os.PathLike) -> bool:
  """True if `directory` holds a bundle's manifest."""
  return artifacts.committed(str(directory), KIND) is not None


def local(source: str | os.PathLike) -> Path:
  """A local folder for a workdir or bundle `source`: a local path, a `gs://` (or other
  `etils.epath`) URL, `hf://org/name[@revision]` or a bare Hub repo id `org/name`."""
  text = os.fspath(source)
  path = Path(text).expanduser()
  hub = _HUB_ID.match(text)
  if text.startswith("hf://") and hub is None:
    raise UserError(f"{text!r} is not a Hugging Face Hub repo id; use hf://org/name[@revision]")
  if hub and (text.startswith("hf://") or not (path.exists() or path.parent.exists())):
    return _from_hub(hub["repo"], hub["revision"])
  if _URL.match(text):
    return _from_url(text)
  return path


def _from_hub(repo: str, revision: str | None) -> Path:
  import huggingface_hub

  try:
    return Path(huggingface_hub.snapshot_download(repo, revision=revision))
  except Exception as e:  # offline and not cached, unknown repo or revision, no network
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise UserError(f"no workdir or bundle at {repo!r}, and the Hugging Face Hub repo {repo!r} "
                    f"could not be fetched ({type(e).__name__}: {first}); check the name, "
                    f"the network, or HF_HUB_OFFLINE / HF_HUB_CACHE") from None


def _from_url(url: str) -> Path:
  """A local copy of the bundle at `url` (read through etils.epath), made once."""
  from etils import epath

  final = artifacts.cache_root() / "bundles" / artifacts.fingerprint(url)
  if is_bundle(final):
    return final
  remote = epath.Path(url)
  work = final.with_name(final.name + ".partial")
  try:
    found = (remote / artifacts.MANIFEST).exists()
    if found:
      print(f"copying the bundle {url} to {final}", flush=True)
      shutil.rmtree(work, ignore_errors=True)
      copy_tree(remote, work)
  except Exception as e:  # no credentials, no gcsfs/tensorflow backend, network
    raise UserError(f"cannot read the bundle {url} ({type(e).__name__}: {str(e)[:160]}); "
                    f"check access, or copy it locally (gsutil cp -r) and pass the folder"
                    ) from None
  if not found:
    raise UserError(f"{url} holds no bundle (no {artifacts.MANIFEST}); write one with "
                    f"python -m training.export --workdir DIR --out DIR and copy it there")
  return artifacts.commit_dir(work, final)


def copy_tree(source: Any, dest: Path) -> None:
  """Copies the files under `source` (an `etils.epath.Path` or a local path) into `dest`,
  the top manifest last (a folder with its manifest is complete)."""
  files = sorted(_files(source), key=lambda p: p == source / artifacts.MANIFEST)
  for src in files:
    out = dest / os.fspath(src.relative_to(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, open(out, "wb") as writer:
      shutil.copyfileobj(reader, writer, 1 << 24)


def _files(directory: Any) -> list[Any]:
  """Every file under `directory`, listing one folder at a time (epath refuses `**` globs
  on buckets)."""
  out = []
  for child in directory.iterdir():
    out.extend(_files(child) if child.is_dir() else [child])
  return out


def load_config(directory: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The bundle's config with its paths pointing into `directory` (after checking the
  bundle's files: sizes, and checksums under `artifacts.verification`); None if
  `directory` is a plain workdir."""
  directory = Path(directory).absolute()
  if not is_bundle(directory):
    return None
  manifest = artifacts.check_files(directory, rebuild="export the bundle again")
  config = configs.from_json((directory / CONFIG).read_text())
  for dotted, relative in manifest["paths"].items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = str(directory / relative)
  configs.validate(config)
  return config
