"""Export a run as a self-contained bundle (layout: `training.bundle`):

    python -m training.export --workdir runs/retro_small --out bundles/retro_small [--step N]
        [--push-to org/name [--private]]

Copies the orbax checkpoint (the latest, or `--step`), the resolved config, the LM
tokenizer, the chunk embedder (families that retrieve) and every cached artifact that
evaluation and generation read for the run (the packed dataset, the datastore, its chunk
embeddings and FAISS index, neighbours or candidates, a kNN-LM datastore: building any
that is missing, in the run's cache), then prints the bundle's parts and size.
`--push-to` uploads the folder to the Hugging Face Hub (`huggingface_hub.upload_folder`;
needs a token with write access, e.g. `hf auth login`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

import models
from common import artifacts, cli
from common.errors import UserError, cli_main
from data import dataset, tokenizer as tokenizer_lib
from inference import stores
from retrieval import build, embedder as embedder_lib
from training import bundle, checkpoint, evaluation

_EMBEDDER_FILES = ("*.json", "*.txt", "*.safetensors")  # what `Embedder` reads
# Not copied: the packed dataset replaces the corpus; the tokenizer is saved as a folder.
_SKIPPED_KINDS = ("corpus-download", "tokenizer")


def _read_everything(config: ml_collections.ConfigDict, params: Any, step: int
                     ) -> dataset.Prepared:
  """Loads (building what is missing) the artifacts that eval.py and generate.py read."""
  built = build.build_all(config)
  if build.retrieval_request(config) is not None:
    stores.ChunkStore(config, built.prepared)
  if models.get_family(config.model).knn_default:
    evaluation.knn_datastore(config, params, built.prepared, step)
  return built.prepared


def used_artifacts(config: ml_collections.ConfigDict, params: Any, step: int
                   ) -> tuple[dataset.Prepared, list[tuple[str, Path]]]:
  """The prepared data, and (kind, directory) of every cached artifact that evaluation and
  generation of the run read: loaded once (building what is missing), then again with
  building forbidden, noting each artifact as its files are checked."""
  _read_everything(config, params, step)
  with artifacts.verification(full=False, build=False) as report:
    prepared = _read_everything(config, params, step)
  return prepared, [(kind, Path(directory)) for kind, directory, _, _ in report
                    if kind not in _SKIPPED_KINDS]


def export(workdir: str | Path, out: str | Path, step: int | None = None,
           repo_id: str | None = None) -> dict:
  """Writes the bundle of `workdir`'s checkpoint at `step` (None: the latest) to `out`
  (which must not exist or be empty); returns the bundle's manifest. `repo_id`: the Hub
  repo it is meant for (named in its README.md)."""
  workdir, out = bundle.local(workdir), Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"{out} exists and is not empty; choose another --out or delete it")
  meta = checkpoint.restore_meta(workdir, step)
  step = int(meta["step"])
  config, params = checkpoint.load_checkpoint(workdir, step)
  prepared, used = used_artifacts(config, params, step)
  work = out.with_name(out.name + ".partial")
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  shutil.copytree(checkpoint.checkpoint_dir(workdir) / str(step),
                  work / checkpoint.CHECKPOINT_DIR / str(step))
  artifacts.atomic_write_text(work / bundle.CONFIG, config.to_json_best_effort(indent=2))
  paths = {"data.tokenizer": _save_tokenizer(prepared.tokenizer, work / "tokenizer"),
           "data.cache_dir": "cache"}
  if build.retrieval_request(config) is not None:
    paths["retrieval.embedder"] = _copy_embedder(config, work / "embedder")
  root = artifacts.cache_root(config.data.cache_dir).absolute()
  for kind, directory in used:
    relative = Path("cache") / directory.absolute().relative_to(root)
    shutil.copytree(directory, work / relative)
    if kind == "dataset":
      paths["data.corpus"] = relative.as_posix()
    if kind == "datastore":
      paths["retrieval.datastore"] = relative.as_posix()
  if (workdir / "metrics.jsonl").exists():
    shutil.copy2(workdir / "metrics.jsonl", work / "metrics.jsonl")
  (work / "README.md").write_text(_card(config, step, repo_id or "ORG/NAME"))
  manifest = artifacts.write_manifest(
      work, bundle.KIND, meta.get("hashes", {}), step=step, config=config.name,
      model=config.model.name, source=str(workdir), paths=paths,
      bytes=sum(sizes(work).values()))
  artifacts.commit_dir(work, out)
  return manifest


def _save_tokenizer(tok: tokenizer_lib.Tokenizer, folder: Path) -> str:
  """Saves the run's tokenizer as a transformers folder; checks it loads the same."""
  tok.hf.save_pretrained(str(folder))
  if tokenizer_lib.Tokenizer.load(str(folder)).hash != tok.hash:
    raise UserError(f"the tokenizer {tok.path!r} does not save and reload identically; "
                    f"use a tokenizer folder with tokenizer.json (data.tokenizer)")
  return folder.name


def _copy_embedder(config: ml_collections.ConfigDict, folder: Path) -> str:
  """Copies the chunk embedder's files (weights, tokenizer, pooling) into `folder`."""
  source = embedder_lib.resolve_model_dir(config.retrieval.embedder)
  for pattern in _EMBEDDER_FILES:
    for path in source.rglob(pattern):
      target = folder / path.relative_to(source)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(path, target)
  return folder.name


def _card(config: ml_collections.ConfigDict, step: int, repo_id: str) -> str:
  """The bundle's README.md (the Hub shows it as the model card)."""
  return (f"---\ntags: [retrozoo, retrieval-augmented-generation, jax, flax]\n---\n"
          f"# retrozoo run bundle: `{config.name}` ({config.model.name}), step {step}\n\n"
          f"An orbax checkpoint with its config, tokenizer, chunk embedder and retrieval "
          f"artifacts, written by `python -m training.export`. Load it from a folder, "
          f"`gs://...` or the Hub (nothing is rebuilt):\n\n"
          f"```python\nimport train, eval, generate\n"
          f"config, params = train.load_checkpoint(\"hf://{repo_id}\")\n"
          f"eval.evaluate(\"hf://{repo_id}\")\n"
          f"generate.generate(\"hf://{repo_id}\", [\"To be, or not to be\"])\n```\n")


def sizes(folder: Path) -> dict[str, int]:
  """Bytes per part of a bundle folder: checkpoint, tokenizer, embedder, each artifact."""
  out: dict[str, int] = {}
  for path in folder.rglob("*"):
    if path.is_file():
      parts = path.relative_to(folder).parts
      key = "/".join(parts[:{"cache": 3, checkpoint.CHECKPOINT_DIR: 2}.get(parts[0], 1)])
      out[key] = out.get(key, 0) + path.stat().st_size
  return out


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
  """Uploads a bundle folder to the Hugging Face Hub model repo `repo_id` (created if
  missing); returns the commit URL."""
  import huggingface_hub

  api = huggingface_hub.HfApi()
  api.create_repo(repo_id, private=private, exist_ok=True)
  commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                             commit_message="retrozoo run bundle")
  return str(getattr(commit, "commit_url", commit))


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
  p = cli.parser("Export a run's checkpoint and retrieval artifacts as one folder.",
                 config_required=False)
  p.add_argument("--workdir", required=True, help="run directory written by train.py")
  p.add_argument("--out", required=True, help="the bundle folder to write (new or empty)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--push-to", default=None, help="also upload to this Hub repo (org/name)")
  p.add_argument("--private", action="store_true", help="create the Hub repo private")
  args, _ = cli.parse(p, argv)
  manifest = export(args.workdir, args.out, args.step, args.push_to)
  for part, size in sorted(sizes(Path(args.out)).items()):
    print(f"  {part:<48} {size / 2**20:10.2f} MiB")
  print(f"wrote {args.out}: step {manifest['step']} of {manifest['config']}, "
        f"{manifest['bytes'] / 2**20:.2f} MiB")
  if args.push_to:
    print(f"uploaded to {push(args.out, args.push_to, args.private)}")
  return manifest


if __name__ == "__main__":
  main(sys.argv[1:])
