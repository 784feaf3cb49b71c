"""What a run publishes: `recipe export`, `recipe push`, and the recipe's `output.export` and
`output.push_to_hub` at the end of `recipe run` (checked before any stage runs, done after the last)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.export.formats import check_format
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.run.lockfile import load_run_recipe, read_lock, write_lock
from recipe_runner.runfolder.layout import RunFolder

Say = Callable[[str], None]


def _steps(lock: dict | None) -> int | None:
    return (((lock or {}).get("stages") or {}).get("train") or {}).get("steps")


def check_publish(loaded: LoadedRecipe) -> None:
    """Before any stage runs: every `output.export` format exists for the family, and a push could
    happen (online, with a token). Exit code 2, nothing trained, when not."""
    recipe = loaded.recipe
    out, lora = recipe.output, recipe.train.lora is not None
    for fmt in out.export:
        try:
            check_format(fmt, recipe.model.resolved_family, lora=lora)
        except UserError as e:
            raise UserError(f"output.export: {e.message}", hint=e.hint) from None
        if fmt == "control-lora" and not lora and out.export_rank is None:
            raise UserError(
                "output.export: control-lora of a fully trained ControlNet needs output.export_rank",
                hint="e.g. output.export_rank: 128 (the relative error is reported), or train with "
                "train.lora",
            )
    if out.push_to_hub:
        from recipe_runner.export.hub import check_push

        check_push(out.hub_model_id)


def publish(loaded: LoadedRecipe, folder: RunFolder, lock: dict, say: Say) -> dict[str, Any]:
    """`output.export` and `output.push_to_hub` after `recipe run`'s stages (records them in `lock`)."""
    out = loaded.recipe.output
    result: dict[str, Any] = {}
    if out.export:
        from recipe_runner.export.write import export_run

        rank = out.export_rank if loaded.recipe.train.lora is None else None
        result["exports"] = [
            export_run(loaded, folder, fmt, steps=_steps(lock), dtype=out.export_dtype, rank=rank, say=say)
            for fmt in out.export
        ]
    if out.push_to_hub:
        from recipe_runner.export.hub import push_folder

        result["push"] = push_folder(folder, out.hub_model_id, private=out.hub_private, say=say)
    if result:
        lock["publish"] = result
        write_lock(folder.lock, lock)
    return result


def export_folder(
    run_dir: Path, formats: list[str], *, dtype: str = "fp16", rank: int | None = None, say: Say
) -> list[dict[str, Any]]:
    """`recipe export RUN_DIR --format F...`: every format checked first, then each written."""
    from recipe_runner.export.write import export_run

    folder = RunFolder(Path(run_dir))
    loaded, lock = load_run_recipe(folder)
    recipe = loaded.recipe
    for fmt in formats:
        check_format(fmt, recipe.model.resolved_family, lora=recipe.train.lora is not None)
    return [
        export_run(loaded, folder, f, steps=_steps(lock), dtype=dtype, rank=rank, say=say) for f in formats
    ]


def push_run(run_dir: Path, *, repo_id: str | None = None, private: bool | None = None, say: Say) -> dict:
    """`recipe push RUN_DIR`: upload a finished run to its `output.hub_model_id` (or `repo_id`)."""
    from recipe_runner.export.hub import check_push, push_folder

    folder = RunFolder(Path(run_dir))
    loaded, _ = load_run_recipe(folder)
    out = loaded.recipe.output
    repo = repo_id or out.hub_model_id
    if not repo:
        raise UserError(
            f"{folder.root}: the recipe sets no output.hub_model_id",
            hint="pass --repo-id owner/name",
        )
    token = check_push(repo)
    result = push_folder(
        folder, repo, private=out.hub_private if private is None else private, token=token, say=say
    )
    lock = read_lock(folder.lock) or {}
    lock["publish"] = {**(lock.get("publish") or {}), "push": result}
    write_lock(folder.lock, lock)
    return result
