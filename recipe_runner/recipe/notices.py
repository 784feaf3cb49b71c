"""Warnings about a recipe that still works but should change: located like errors, never fatal.

Today: a hub id known to have moved (model.MOVED_HUB_IDS). Works on the merged recipe data and its
origins, so a preset (which is no whole recipe) gets the same warnings as the recipes extending it.
No torch, no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipe_runner.errors import Problem
from recipe_runner.recipe.loader import origin_of, resolve_against
from recipe_runner.recipe.model import MOVED_HUB_IDS
from recipe_runner.recipe.yaml_io import Origin, Path_

# The fields that name a hub model repository (vae ids were not moved).
_MODEL_ID_FIELDS: tuple[Path_, ...] = (("model", "base"), ("model", "controlnet"))


def _at(data: Any, path: Path_) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def recipe_warnings(data: dict, origins: dict[Path_, Origin], file: str, base_dir: Path) -> list[Problem]:
    """Every warning for merged recipe `data` (from loader.load_data), each at the file:line:col that set
    the value; `base_dir` is the recipe's folder (a local folder that happens to be named like an old id
    is no hub id)."""
    found: list[Problem] = []
    for path in _MODEL_ID_FIELDS:
        ref = _at(data, path)
        if not isinstance(ref, str) or ref.lower() not in MOVED_HUB_IDS:
            continue
        if resolve_against(base_dir, ref).exists():
            continue
        new = MOVED_HUB_IDS[ref.lower()]
        o = origin_of(origins, path)
        dotted = ".".join(map(str, path))
        found.append(
            Problem(
                f"{ref!r} was removed from the Hugging Face hub; it is now {new!r} (a copy in your local hub "
                "cache still loads, a machine without one cannot download it)",
                path=dotted,
                file=o.file if o else file,
                line=o.line if o else None,
                column=o.column if o else None,
                hint=f"use {dotted}: {new}",
            )
        )
    return found
