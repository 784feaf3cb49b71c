"""Presets: files that recipes extend but that are no recipe themselves (recipes/base/*.yaml).

A file is a preset when it is in a folder named `base` (the shipped layout, `extends: base/sd15.yaml`)
or when its leading comment lines include `# recipe-runner: preset`. Both are visible in the file's
path or text, so a file validates the same way alone, with others, in an editor or in CI; guessing
from missing fields would let a recipe that forgot its `name` pass.

A preset gets every check that concerns one field: unknown keys (with did-you-mean), types, ranges and
formats. Required fields (`name`, `dataset.source`, a condition's `type`) may be missing, and checks
that combine fields (e.g. `evaluate.enabled` needs `dataset.holdout`) are left to the recipes that
extend it, which may set the other half.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recipe_runner.errors import Problem, RecipeError
from recipe_runner.recipe.condition import CONDITION_TYPES
from recipe_runner.recipe.errors import MISSING, model_at, problems_from_validation
from recipe_runner.recipe.loader import load_data
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.recipe.yaml_io import Origin, Path_

PRESET_FOLDER = "base"
PRESET_MARKER = "# recipe-runner: preset"
_MARKER_RE = re.compile(r"#\s*recipe-runner:\s*preset\s*", re.IGNORECASE)
# Errors that only say something is absent: a recipe extending the preset supplies it.
_ABSENT = {"missing", "union_tag_not_found"}
PRESET_HINT = (
    "is this a preset (a file other recipes extend)? keep it in a folder named base/ or put a "
    f"`{PRESET_MARKER}` line in its header comments: `recipe validate` then checks it as a preset"
)


def is_preset(path: Path) -> bool:
    """Whether `path` is validated as a preset: in a `base/` folder, or marked in its header comments."""
    if path.absolute().parent.name == PRESET_FOLDER:
        return True
    if not path.is_file():  # a FIFO or a device would block or never end; the loader says what it is
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                text = line.strip()
                if not text:
                    continue
                if not text.startswith("#"):
                    return False
                if _MARKER_RE.fullmatch(text):
                    return True
    except (OSError, UnicodeDecodeError):
        pass  # the loader reports an unreadable file
    return False


@dataclass
class LoadedPreset:
    """A preset's merged data (its own `extends` and `--set` applied) and where each value came from."""

    path: Path
    data: dict[str, Any]
    origins: dict[Path_, Origin]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _clean_loc(loc: tuple) -> Path_:
    # As recipe/errors.py: Pydantic puts the condition's discriminator tag into the location.
    if len(loc) > 1 and loc[0] == "condition" and loc[1] in CONDITION_TYPES:
        return (loc[0], *loc[2:])
    return tuple(loc)


def _needs_whole_recipe(err: Any, data: dict) -> bool:
    """An absent required field, or a model validator's cross-field check (its location is a section,
    not a field: field validators are located at their field)."""
    if err["type"] in _ABSENT:
        return True
    return err["type"] == "value_error" and model_at(_clean_loc(err["loc"]), data) is not None


def load_preset(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedPreset:
    """Load a preset and check it as a partial recipe; raises `RecipeError` with every problem."""
    path = Path(path)
    problems: list[Problem] = []
    data, origins = load_data(path, overrides, problems)
    try:
        Recipe.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        kept = [err for err in e.errors(include_url=False) if not _needs_whole_recipe(err, data)]
        if kept:
            partial = ValidationError.from_exception_data(e.title, kept)  # type: ignore[arg-type]
            problems += problems_from_validation(partial, data, origins, str(path))
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.file or "", p.line or 0, p.column or 0)))
    return LoadedPreset(path, data, origins)


def add_preset_hint(problems: list[Problem]) -> None:
    """Point at the preset rule when a file misses both `name` and `dataset` (a preset, most likely)."""
    missing = {p.path: p for p in problems if p.message == MISSING}
    if "name" in missing and "dataset" in missing and missing["name"].hint is None:
        missing["name"].hint = PRESET_HINT
