"""What a run publishes: `recipe export`, `recipe push`, and the recipe's `output.export` and
`output.push_to_hub` at the end of `recipe run` (checked before any stage runs, done after the last).

Like the stages, each export and the push is skipped when its output is current: an export when its
file exists and was made from the weights now in `controlnet/` (their size and mtime, recorded in the
lock's `publish`), with the same dtype and rank; the push when the files it would upload are those it
uploaded last time, to the same repository. `recipe plan` shows them with the stages (`publish_plan`,
torch-free).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.export.formats import check_format, export_file, export_name
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.run.lockfile import load_run_recipe, read_lock, write_lock
from recipe_runner.runfolder.layout import RunFolder

Say = Callable[[str], None]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class PublishStep:
    """One export or the push, as `recipe plan` and `recipe run` see it before doing it."""

    name: str  # "export single-file", "push"
    runs: bool
    reason: str
    target: str  # the file or folder written, or the repository pushed to

    def to_dict(self) -> dict[str, Any]:
        status = "would run" if self.runs else "cached"
        return {"name": self.name, "status": status, "reason": self.reason, "target": self.target}


def _steps(lock: dict | None) -> int | None:
    return (((lock or {}).get("stages") or {}).get("train") or {}).get("steps")


def weights_signature(folder: RunFolder) -> str | None:
    """Which weights `controlnet/` holds now, cheaply: training rewrites the file (new mtime)."""
    try:
        st = (folder.controlnet / WEIGHTS).stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def upload_signature(folder: RunFolder) -> str:
    """The files a push would upload, as they are now. The lock is left out (every run rewrites it;
    what it records is in the other files) and the resolved recipe counts by content (rewritten too)."""
    from recipe_runner.export.hub import _uploaded

    h = hashlib.sha256()
    for p in sorted(_uploaded(folder.root)):
        rel = p.relative_to(folder.root).as_posix()
        if rel == folder.lock.name:
            continue
        if rel == folder.resolved_recipe.name:
            h.update(f"{rel}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
        else:
            st = p.stat()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _rank(loaded: LoadedRecipe, fmt: str, rank: int | None) -> int | None:
    """The rank a control-lora export is made at: the asked one, or a LoRA run's own."""
    if fmt != "control-lora":
        return None
    lora = loaded.recipe.train.lora
    return rank if rank is not None or lora is None else lora.rank


def export_target(
    loaded: LoadedRecipe, folder: RunFolder, fmt: str, *, steps: int | None, dtype: str, rank: int | None
) -> Path:
    """Where export `fmt` of the run goes (export/write.py writes there)."""
    recipe = loaded.recipe
    stem = export_name(recipe.name, recipe.model.resolved_family, recipe.condition.type, steps, fmt)
    return folder.export / export_file(stem, fmt, dtype=dtype, rank=_rank(loaded, fmt, rank))


def _recorded(lock: dict | None) -> dict[str, Any]:
    return (lock or {}).get("publish") or {}


def _export_change(entry: dict | None, target: Path, folder: RunFolder) -> str | None:
    """Why export `target` must be made again, or None when the one made last is current."""
    if not entry:
        return "not exported yet"
    # By name: the folder may be reached by another path (relative, moved) than when it was exported.
    made = Path(str(entry.get("path"))).name
    if made != target.name:
        return f"last made as {made}"
    if not target.exists():
        return "its file is gone"
    if entry.get("weights") != weights_signature(folder):
        return "the weights changed since"
    return None


def publish_plan(
    loaded: LoadedRecipe,
    folder: RunFolder,
    lock: dict | None,
    *,
    stages_run: list[str],
    steps: int | None = None,
) -> list[PublishStep]:
    """The exports and the push `recipe run` would do after `stages_run`, and which are current.

    `lock`: the run folder's lock as it is now; `steps`: the trained steps the names will carry (default:
    the lock's, or `train.max_steps` when training is to run)."""
    out = loaded.recipe.output
    recorded = _recorded(lock)
    done = {e.get("format"): e for e in recorded.get("exports") or []}
    rank = out.export_rank if loaded.recipe.train.lora is None else None
    if steps is None:
        steps = loaded.recipe.train.max_steps if "train" in stages_run else _steps(lock)
    plan: list[PublishStep] = []
    for fmt in out.export:
        target = export_target(loaded, folder, fmt, steps=steps, dtype=out.export_dtype, rank=rank)
        if "train" in stages_run:
            plan.append(PublishStep(f"export {fmt}", True, "after training", str(target)))
        elif (why := _export_change(done.get(fmt), target, folder)) is None:
            plan.append(PublishStep(f"export {fmt}", False, "made from these weights", str(target)))
        else:
            plan.append(PublishStep(f"export {fmt}", True, why, str(target)))
    if out.push_to_hub:
        repo = str(out.hub_model_id)
        last = recorded.get("push") or {}
        where = f"{repo} ({'private' if out.hub_private else 'public'})"
        if stages_run or any(s.runs for s in plan):
            why = f"after the {(stages_run or ['export'])[-1]} stage"
            plan.append(PublishStep("push", True, why, where))
        elif last.get("repo_id") != repo or last.get("private") != out.hub_private:
            plan.append(PublishStep("push", True, "not pushed there yet", where))
        elif last.get("files_signature") != upload_signature(folder):
            plan.append(PublishStep("push", True, "files changed since the last push", where))
        else:
            plan.append(PublishStep("push", False, "these files were pushed", where))
    return plan


def check_publish(loaded: LoadedRecipe, pending: list[PublishStep] | None = None) -> None:
    """Before any stage runs: a push that is going to happen (`pending`: publish_plan's; None: any) could
    (online, with a token). Exit code 2, nothing trained, when not. (The recipe model checks that each
    `output.export` format exists for the run.)"""
    out = loaded.recipe.output
    pushes = pending is None or any(s.name == "push" and s.runs for s in pending)
    if out.push_to_hub and pushes:
        from recipe_runner.export.hub import check_push

        check_push(out.hub_model_id)


def _record_export(lock: dict, folder: RunFolder, entry: dict[str, Any]) -> None:
    recorded = lock.setdefault("publish", {})
    others = [e for e in recorded.get("exports") or [] if e.get("format") != entry["format"]]
    recorded["exports"] = [*others, {**entry, "weights": weights_signature(folder)}]


def _record_push(lock: dict, folder: RunFolder, result: dict[str, Any]) -> None:
    lock.setdefault("publish", {})["push"] = {**result, "files_signature": upload_signature(folder)}


def publish(
    loaded: LoadedRecipe, folder: RunFolder, lock: dict, say: Say, *, ran: list[str]
) -> dict[str, Any]:
    """`output.export` and `output.push_to_hub` after `recipe run`'s stages (`ran`: those that ran);
    records them in `lock`. Returns each step's result, `{"skipped": True, ...}` for current ones."""
    out = loaded.recipe.output
    steps = publish_plan(loaded, folder, lock, stages_run=ran, steps=_steps(lock))
    result: dict[str, Any] = {}
    rank = out.export_rank if loaded.recipe.train.lora is None else None
    for step in steps:
        if not step.runs:
            say(f"✓ {step.name}: skipped ({step.reason}: {step.target})")
            result[step.name] = {"skipped": True, "reason": step.reason, "target": step.target}
            continue
        started = time.perf_counter()
        if step.name == "push":
            from recipe_runner.export.hub import push_folder

            pushed = push_folder(folder, out.hub_model_id, private=out.hub_private, say=say)
            _record_push(lock, folder, pushed)
            result["push"] = pushed
        else:
            from recipe_runner.export.write import export_run

            fmt = step.name.removeprefix("export ")
            entry = export_run(
                loaded, folder, fmt, steps=_steps(lock), dtype=out.export_dtype, rank=rank, say=say
            )
            _record_export(lock, folder, entry)
            result[step.name] = entry
        result[step.name] = {**result[step.name], "seconds": round(time.perf_counter() - started, 2)}
    if result:
        write_lock(folder.lock, lock)
    return result


def export_folder(
    run_dir: Path, formats: list[str], *, dtype: str = "fp16", rank: int | None = None, say: Say
) -> list[dict[str, Any]]:
    """`recipe export RUN_DIR --format F...`: every format checked first, then each written (always:
    asked by name), and recorded in the lock so that `recipe run` knows them current."""
    from recipe_runner.export.write import export_run

    folder = RunFolder(Path(run_dir))
    loaded, lock = load_run_recipe(folder)
    recipe = loaded.recipe
    for fmt in formats:
        check_format(fmt, recipe.model.resolved_family, lora=recipe.train.lora is not None)
    results = []
    for fmt in formats:
        entry = export_run(loaded, folder, fmt, steps=_steps(lock), dtype=dtype, rank=rank, say=say)
        _record_export(lock, folder, entry)
        write_lock(folder.lock, lock)
        results.append(entry)
    return results


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
    _record_push(lock, folder, result)
    write_lock(folder.lock, lock)
    return result
