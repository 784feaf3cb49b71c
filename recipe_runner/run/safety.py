"""What a run may touch: only a folder of its own, apart from everything the recipe reads.

A run replaces `dataset/`, `README.md`, `checkpoints/step-*` and removes its own temporaries in its
folder, so that folder must neither hold nor sit inside any of the recipe's inputs, and an existing
folder must be one a run made (or empty). Checked by `recipe validate` and `plan`, and again before any
stage writes, so a mistake is exit 2 with nothing touched. No torch, no network.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from recipe_runner.errors import Problem, RecipeError, UserError
from recipe_runner.recipe.checks import looks_local, problem_at
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.shards import shard_files
from recipe_runner.recipe.yaml_io import Path_
from recipe_runner.runfolder.layout import RUN_MARKERS, RunFolder

_SHOWN = 6  # entries of a refused folder named in the message


def run_root(loaded: LoadedRecipe, output_dir: str | Path | None = None) -> Path:
    """The run folder: `--output-dir`, else `output.dir`, else runs/NAME (relative to the working
    directory, `~` expanded). `recipe run`, `plan` and the checks all ask here."""
    if output_dir is not None and str(output_dir).strip() == "":
        raise UserError(
            "--output-dir is empty",
            hint="name the run folder, e.g. --output-dir runs/my-run (use --output-dir . for the "
            "current folder, if it is empty or a run folder)",
        )
    chosen = str(output_dir) if output_dir is not None else loaded.recipe.output_dir
    return Path(chosen).expanduser()


def recipe_inputs(loaded: LoadedRecipe) -> Iterator[tuple[Path_, str, Path]]:
    """(field, what, absolute path) for every local file or folder the recipe reads."""
    r = loaded.recipe
    for i, file in enumerate(loaded.files):
        yield ("extends",) if i else (), "the recipe" if i == 0 else "an extended recipe", file
    src = r.dataset.source
    for key in ("path", "conditioning_dir"):
        if (ref := getattr(src, key)) is not None:
            yield ("dataset", "source", key), f"dataset.source.{key}", loaded.resolve(ref)
    if src.webdataset is not None:
        # The shard files themselves, not their folder: a pattern reads only the files it names, so a run
        # folder beside them (runs/ next to shards in the recipe's folder) touches none of them.
        try:
            shards = shard_files(loaded)
        except UserError:  # no shards yet: `recipe validate` says so
            shards = []
        for shard in shards:
            yield ("dataset", "source", "webdataset"), "a shard of dataset.source.webdataset", shard
    for key in ("base", "controlnet", "vae"):
        ref = getattr(r.model, key)
        if ref and not ref.startswith("builtin:"):
            local = loaded.resolve(ref)
            if local.exists() or looks_local(ref):
                yield ("model", key), f"model.{key}", local
    annotator = getattr(r.condition, "annotator", None)
    if annotator and (looks_local(annotator) or loaded.resolve(annotator).is_dir()):
        yield ("condition", "annotator"), "condition.annotator", loaded.resolve(annotator)
    for i, image in enumerate(r.train.validation.conditioning_images):
        yield ("train", "validation", "conditioning_images", i), "a validation image", loaded.resolve(image)
    if r.launch.accelerate_config:
        yield (
            ("launch", "accelerate_config"),
            "launch.accelerate_config",
            loaded.resolve(r.launch.accelerate_config),
        )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))  # symlinks followed: two spellings of one folder still overlap


def check_run_folder(loaded: LoadedRecipe, output_dir: str | Path | None = None) -> list[Problem]:
    """Every reason the run folder would touch what is not the run's own; empty when it is safe."""
    root = run_root(loaded, output_dir)
    real = _real(root)
    where = ("output", "dir") if output_dir is None else ()
    shown = str(root) if output_dir is None else f"--output-dir {root}"
    problems: list[Problem] = []
    for field, what, path in recipe_inputs(loaded):
        p = _real(path)
        if p == real or p.is_relative_to(real):
            relation = "is" if p == real else "holds"
        elif real.is_relative_to(p) and not p.is_file():
            relation = "is inside"
        else:
            continue
        problems.append(
            problem_at(
                loaded,
                where or field,
                f"the run folder {shown} ({real}) {relation} {what} {path}: a run replaces dataset/, "
                "README.md and checkpoints/ in its folder and would overwrite or delete it",
                hint="set output.dir (or --output-dir) to a folder of its own, e.g. runs/"
                f"{loaded.recipe.name}, outside the data, models and recipes",
            )
        )
    if not problems and root.exists():
        problems += _not_a_run_folder(loaded, root, where, shown)
    return problems


def _not_a_run_folder(loaded: LoadedRecipe, root: Path, where: Path_, shown: str) -> list[Problem]:
    if not root.is_dir():
        return [problem_at(loaded, where, f"the run folder {shown} is a file, not a folder")]
    if RunFolder(root).made_by_a_run():
        return []
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    except OSError as e:
        return [problem_at(loaded, where, f"the run folder {shown} cannot be read: {e.strerror}")]
    if not entries:
        return []
    listed = ", ".join(entries[:_SHOWN]) + (
        f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    )
    return [
        problem_at(
            loaded,
            where,
            f"the run folder {shown} already holds files that no run wrote ({listed}); a run replaces "
            f"what it finds under its own names there (it has none of {', '.join(RUN_MARKERS)})",
            hint="choose a new or empty folder (e.g. --output-dir runs/"
            f"{loaded.recipe.name}), or move those files away",
        )
    ]


def ensure_run_folder(loaded: LoadedRecipe, output_dir: str | Path | None = None) -> RunFolder:
    """The run folder, or `RecipeError` with every reason it is not safe to write."""
    problems = check_run_folder(loaded, output_dir)
    if problems:
        raise RecipeError(problems)
    return RunFolder(run_root(loaded, output_dir))
