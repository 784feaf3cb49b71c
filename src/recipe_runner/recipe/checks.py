"""Checks that need the filesystem: the paths a recipe names exist, hub ids are well-formed.

Run by `recipe validate` and before any stage; no network, no torch, no user code.
"""

from __future__ import annotations

from pathlib import Path

from recipe_runner.errors import Problem
from recipe_runner.recipe.dataset import HUB_ID_RE
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.yaml_io import Path_


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1


def resolve_path(loaded: LoadedRecipe, ref: str) -> Path:
    """A path from the recipe, relative to the recipe's folder."""
    p = Path(ref).expanduser()
    return p if p.is_absolute() else loaded.base_dir / p


def _problem(loaded: LoadedRecipe, path: Path_, msg: str, hint: str | None = None) -> Problem:
    o = loaded.origin_of(path)
    return Problem(
        msg,
        path=".".join(map(str, path)),
        file=o.file if o else str(loaded.path),
        line=o.line if o else None,
        column=o.column if o else None,
        hint=hint,
    )


def _model_ref(loaded: LoadedRecipe, path: Path_, ref: str | None, what: str) -> list[Problem]:
    if ref is None or ref.startswith("builtin:"):
        return []
    local = resolve_path(loaded, ref)
    if local.exists():
        if not local.is_dir():
            return [_problem(loaded, path, f"{what} {ref!r} is a file; expected a diffusers folder")]
        return []
    if _looks_local(ref):
        return [_problem(loaded, path, f"{what} folder {ref!r} not found (looked at {local})")]
    if not HUB_ID_RE.match(ref):
        return [
            _problem(
                loaded,
                path,
                f"{what} {ref!r} is neither an existing folder nor a hub id",
                hint="use 'owner/name' for the hub, or a path starting with ./ for a local folder",
            )
        ]
    return []


def check_inputs(loaded: LoadedRecipe) -> list[Problem]:
    """Every problem with the files and ids a valid recipe refers to."""
    r = loaded.recipe
    problems: list[Problem] = []
    src = r.dataset.source
    for key in ("path", "conditioning_dir"):
        ref = getattr(src, key)
        if ref is not None and not resolve_path(loaded, ref).exists():
            where = resolve_path(loaded, ref)
            problems.append(
                _problem(loaded, ("dataset", "source", key), f"{ref!r} not found (looked at {where})")
            )
    problems += _model_ref(loaded, ("model", "base"), r.model.base, "base model")
    problems += _model_ref(loaded, ("model", "controlnet"), r.model.controlnet, "controlnet")
    problems += _model_ref(loaded, ("model", "vae"), r.model.vae, "vae")
    annotator = getattr(r.condition, "annotator", None)
    if annotator and _looks_local(annotator) and not resolve_path(loaded, annotator).is_dir():
        problems.append(
            _problem(loaded, ("condition", "annotator"), f"annotator folder {annotator!r} not found")
        )
    for i, image in enumerate(r.train.validation.conditioning_images):
        if not resolve_path(loaded, image).is_file():
            problems.append(
                _problem(
                    loaded,
                    ("train", "validation", "conditioning_images", i),
                    f"conditioning image {image!r} not found (looked at {resolve_path(loaded, image)})",
                )
            )
    cfg = r.launch.accelerate_config
    if cfg and not resolve_path(loaded, cfg).is_file():
        problems.append(
            _problem(loaded, ("launch", "accelerate_config"), f"accelerate config {cfg!r} not found")
        )
    return problems
