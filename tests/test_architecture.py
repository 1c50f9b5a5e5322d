"""The layout's promises: families are looked up, never branched on; files stay small."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import configs
import models
from models import family as family_lib

ROOT = Path(__file__).resolve().parents[1]
# A model name compared with a literal: == "retro", != 'realm', in ("knnlm", ...).
NAME_LITERAL = re.compile(r"(==|!=|\bin\b)\s*[\(\[\{]?\s*['\"](" +
                          "|".join(family_lib.names()) + r")['\"]")


def _sources() -> list[Path]:
  tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
  return [ROOT / p for p in tracked if not p.startswith("tests/") and (ROOT / p).exists()]


def test_every_family_exports_the_interface_and_every_config_names_one():
  assert set(family_lib.names()) >= {"transformer", "retro", "realm", "knnlm", "incontext"}
  for name in family_lib.names():
    fam = family_lib.get(name)
    assert fam.name == name
  for name in configs.names():
    assert models.get_family(configs.load(name).model).name == configs.load(name).model.name


def test_no_model_name_is_compared_outside_models_and_configs():
  hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
          for p in _sources() if p.relative_to(ROOT).parts[0] not in ("models", "configs")
          for i, line in enumerate(p.read_text().splitlines(), 1) if NAME_LITERAL.search(line)]
  assert not hits, "\n".join(hits)


def test_source_files_are_at_most_about_400_lines_and_say_what_they_own():
  long = {str(p.relative_to(ROOT)): n for p in _sources()
          if (n := len(p.read_text().splitlines())) > 420}
  assert not long, long
  for p in _sources():
    text = p.read_text().lstrip()
    if text and p.name != "__init__.py" or len(text) > 200:
      assert text.startswith(('"""', "#!")), f"{p.relative_to(ROOT)} has no module docstring"
