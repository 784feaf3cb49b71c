"""`recipe run`: the stages a recipe turns into, and the loop that runs them into one run folder.

The stages are registered by name in order (STAGES); `recipe run` (run_recipe), `recipe plan` and the
CLI loop over the registry. Each stage says where its outputs are, whether they are current (and why
not), what it checks before any stage runs, what it warns about, whether `--resume` reruns it, and
runs. Heavy modules are imported inside the stages' methods (their work needs torch; `recipe plan`,
which reads `status`, must not), so this module is cheap to import.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recipe_runner.errors import UserError
from recipe_runner.malloc import release_freed_memory
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.show import resolved_yaml
from recipe_runner.run.lockfile import hardware, load_run_recipe, new_lock, read_lock, write_lock
from recipe_runner.run.notes import learning_rate_note, resolution_note
from recipe_runner.run.publish import check_publish, publish, publish_plan
from recipe_runner.run.resources import check_disk, check_models, warn_accelerator_memory
from recipe_runner.run.safety import ensure_run_folder
from recipe_runner.runfolder.atomic import is_complete, remove_stale_temporaries, write_text
from recipe_runner.runfolder.events import reporter
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.runfolder.log import peak_host_memory_mb, quiet_libraries, run_console
from recipe_runner.training.distributed import announce, announced, check_launch, launched_rank


@dataclass
class RunContext:
    loaded: LoadedRecipe
    folder: RunFolder
    console: Console | None
    previous_lock: dict[str, Any] | None
    lock: dict[str, Any]
    resume: bool = False
    force: bool = False
    results: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    reruns_on_resume: bool  # `--resume` runs it even when its outputs are current (to train longer)
    refresh_hint: str | None  # when its outputs are kept although its own settings changed: how to redo

    def enabled(self, ctx: RunContext) -> bool: ...

    def outputs(self, folder: RunFolder) -> Path:
        """Where its outputs go: their existence tells "stale" from "not made yet"."""
        ...

    def status(self, ctx: RunContext) -> tuple[bool, str]:
        """(outputs current?, why) without doing the work."""
        ...

    def check(self, ctx: RunContext) -> None:
        """Raise UserError for what would stop it, before any stage runs (when it is going to run)."""
        ...

    def notes(self, ctx: RunContext) -> list[str]:
        """Warnings worth reading before it runs (when it is going to run)."""
        ...

    def run(self, ctx: RunContext) -> dict[str, Any]: ...


class _StageDefaults:
    reruns_on_resume = False
    refresh_hint: str | None = None

    def enabled(self, ctx: RunContext) -> bool:
        return True

    def check(self, ctx: RunContext) -> None:
        return None

    def notes(self, ctx: RunContext) -> list[str]:
        return []


class DatasetStage(_StageDefaults):
    name = "dataset"

    def outputs(self, folder: RunFolder) -> Path:
        return folder.dataset

    def status(self, ctx: RunContext) -> tuple[bool, str]:
        from recipe_runner.data.build import dataset_status

        if ctx.force:
            return False, "--force"
        return dataset_status(ctx.loaded, ctx.folder)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from recipe_runner.data.build import build_dataset

        report = build_dataset(ctx.loaded, ctx.folder, console=ctx.console, force=ctx.force)
        report = {k: v for k, v in report.items() if k != "key_inputs"}
        ctx.lock["dataset"] = {
            "fingerprint": report.get("data_sha256"),
            "cache_key": report.get("cache_key"),
            "rows": report.get("rows_out"),
        }
        return report


class TrainStage(_StageDefaults):
    name = "train"
    reruns_on_resume = True

    def outputs(self, folder: RunFolder) -> Path:
        return folder.controlnet

    def check(self, ctx: RunContext) -> None:
        # Optional packages and devices: before the dataset build, not after it.
        from recipe_runner.training.features import check_environment  # imports torch

        check_environment(ctx.loaded.recipe)

    def notes(self, ctx: RunContext) -> list[str]:
        found = (resolution_note(ctx.loaded), learning_rate_note(ctx.loaded.recipe))
        return [note for note in found if note is not None]

    def key(self, ctx: RunContext) -> str:
        from recipe_runner.training import training_cache_key
        from recipe_runner.training.keys import built_dataset_fingerprint

        return training_cache_key(ctx.loaded, built_dataset_fingerprint(ctx.folder.dataset))

    def status(self, ctx: RunContext) -> tuple[bool, str]:
        if not is_complete(ctx.folder.controlnet):
            return False, "no trained weights yet"
        previous = ((ctx.previous_lock or {}).get("stages") or {}).get("train") or {}
        if not (ctx.folder.dataset / "report.json").is_file():
            return False, "dataset missing"
        if previous.get("cache_key") != self.key(ctx):
            return False, "training inputs changed"
        return True, "inputs unchanged"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import torch

        from recipe_runner.errors import RunFailed
        from recipe_runner.run.resources import MEMORY_HINT
        from recipe_runner.training import train_controlnet

        try:
            result = train_controlnet(ctx.loaded, ctx.folder, resume=ctx.resume, console=ctx.console)
        except torch.OutOfMemoryError as e:
            first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
            raise RunFailed(
                f"out of memory while training ({first}); {MEMORY_HINT}. Completed checkpoints are kept: "
                "add --resume to continue from the newest",
                log=str(ctx.folder.log),
            ) from None
        return {**result, "cache_key": self.key(ctx)}


class EvaluateStage(_StageDefaults):
    name = "evaluate"
    # `recipe run` reuses evaluation results while the weights are unchanged, whatever its settings.
    refresh_hint = "`recipe evaluate {run}` refreshes the results"

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.loaded.recipe.evaluate.enabled

    def outputs(self, folder: RunFolder) -> Path:
        return folder.evaluation

    def status(self, ctx: RunContext) -> tuple[bool, str]:
        results = ctx.folder.evaluation / "results.json"
        if not results.is_file():
            return False, "not evaluated yet"
        if not ctx.results.get("train", {}).get("skipped", True):
            return False, "weights changed"
        return True, "weights unchanged"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from recipe_runner.evaluate import evaluate_folder

        return evaluate_folder(ctx.loaded, ctx.folder, console=ctx.console)


STAGES: dict[str, Stage] = {s.name: s for s in (DatasetStage(), TrainStage(), EvaluateStage())}


def stage_names() -> list[str]:
    return list(STAGES)


@contextlib.contextmanager
def exclusive(folder: RunFolder) -> Iterator[None]:
    """One run per folder: a second `recipe run` into a folder in use is refused, not interleaved."""
    folder.root.mkdir(parents=True, exist_ok=True)
    path = folder.root / ".in-use"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UserError(
                f"run folder {folder.root} is in use by {owner}",
                hint="wait for it to finish, or pass --output-dir to run into another folder",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_recipe(
    loaded: LoadedRecipe,
    *,
    stages: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Run the named stages (default: all enabled) in order, skipping those whose inputs are unchanged."""
    folder = ensure_run_folder(loaded, output_dir)  # before anything is written: exit 2 touches nothing
    check_launch(str(loaded.path))
    rank = launched_rank()
    if rank:  # a non-zero rank of the user's `accelerate launch`: rank 0 prepares, this one joins
        from recipe_runner.training.worker import follow  # imports torch

        return follow(folder, resume=resume)
    created = _first_missing(folder.root)  # what to remove if an invalid input stops this run early
    new = created is not None or not any(folder.root.iterdir())
    ran: list[str] = []
    try:
        return _run_stages(loaded, folder, stages, ran, resume=resume, quiet=quiet, force=force)
    except BaseException as e:
        if rank == 0 and not announced(folder):
            announce(folder, train=False, error=str(e) or type(e).__name__)
        # An invalid input leaves nothing behind; under a user's launch, the other ranks still have to
        # read rank 0's error from the folder.
        if isinstance(e, UserError) and new and not ran and rank is None:
            _remove_new_folder(folder.root, created)
        raise


def _first_missing(root: Path) -> Path | None:
    """The outermost folder on the way to `root` that does not exist yet (None: `root` exists)."""
    missing = None
    for p in (root.absolute(), *root.absolute().parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_new_folder(root: Path, created: Path | None) -> None:
    """Undo a folder this invocation created (or filled, when it was empty) before any stage ran."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _run_stages(
    loaded: LoadedRecipe,
    folder: RunFolder,
    stages: list[str] | None,
    ran: list[str],
    *,
    resume: bool,
    quiet: bool,
    force: bool,
) -> dict[str, Any]:
    with exclusive(folder), run_console(folder.log, quiet=quiet) as console:
        for sub in (folder.root, folder.checkpoints, folder.cache):  # what a killed run left
            remove_stale_temporaries(sub)
        recipe = loaded.recipe
        previous = read_lock(folder.lock)
        lock = new_lock(recipe.resolved_dict(), recipe.content_hash(), loaded.path, loaded.overrides)
        if previous:
            lock["stages"] = dict(previous.get("stages") or {})
            lock["dataset"] = previous.get("dataset") or {}
            if previous.get("publish"):  # what was exported and pushed, and from which weights
                lock["publish"] = previous["publish"]
        console.rule(f"[bold]{escape(recipe.name)}[/] → {escape(str(folder.root))}")
        ctx = RunContext(loaded, folder, console, previous, lock, resume=resume, force=force)
        names = stages or [n for n, s in STAGES.items() if s.enabled(ctx)]
        to_run = [n for n in names if (resume and STAGES[n].reruns_on_resume) or not STAGES[n].status(ctx)[0]]
        if stages is None:  # `recipe run` publishes at the end: a push that cannot happen stops it now,
            # first of all, as it needs none of the libraries the other checks import
            check_publish(loaded, publish_plan(loaded, folder, previous, stages_run=to_run))
        if to_run:  # imports diffusers, transformers and datasets (seconds): only when there is work
            quiet_libraries()
        check_disk(loaded, folder.root, to_run)
        for name in to_run:
            STAGES[name].check(ctx)
        warn_accelerator_memory(loaded, to_run, console)
        check_models(loaded, folder, to_run, console)
        for name in to_run:
            for note in STAGES[name].notes(ctx):
                console.print(f"[yellow]warning:[/] {escape(note)}")
        # Only once every check passed: the recorded recipe must be the one the outputs were made with.
        write_text(folder.resolved_recipe, resolved_yaml(recipe, header=f"resolved from {loaded.path}"))
        report = reporter(console)  # stage events for --json
        for name in names:
            stage = STAGES[name]
            current, why = stage.status(ctx)
            report.stage_start(name, why)
            if current and not (resume and stage.reruns_on_resume):
                report.stage_end(name, seconds=0.0, skipped=True)
                console.print(f"[green]✓[/] {name}: skipped ({escape(why)})")
                ctx.results[name] = {"skipped": True, "reason": why}
                lock["stages"][name] = {**(lock["stages"].get(name) or {}), "skipped": True, "reason": why}
                continue
            console.print(f"[bold cyan]▶[/] {name}: running ({escape(why)})")
            started = time.perf_counter()
            result = stage.run(ctx)
            release_freed_memory()  # what this stage freed is not held under the next one's peak
            ran.append(name)
            lock["hardware"] = hardware()  # now with the GPUs the stage's torch saw
            seconds = round(time.perf_counter() - started, 2)
            report.stage_end(name, seconds=seconds, skipped=False)
            timing = {"skipped": False, "seconds": seconds, "peak_rss_mb": round(peak_host_memory_mb())}
            ctx.results[name] = {**result, **timing}
            lock["stages"][name] = {**_lockable(result), "reason": why, **timing}
            write_lock(folder.lock, lock)
        if not ran and previous and previous.get("hardware"):
            lock["hardware"] = previous["hardware"]  # the outputs are still those of that machine's run
        write_lock(folder.lock, lock)
        if stages is None:
            published = publish(loaded, folder, lock, lambda m: console.print(escape(m)), ran=ran)
            ctx.results.update(_published(published))
        if launched_rank() == 0 and not announced(folder):
            announce(folder, train=False)  # nothing to train: the waiting ranks may leave
        _summary(console, folder, ctx.results)
    return {"run_dir": str(folder.root), "stages": ctx.results}


def _published(published: dict[str, Any]) -> dict[str, Any]:
    """The summary rows of the exports and the push: a path or a repository each, or why skipped."""
    rows: dict[str, Any] = {}
    for name, r in published.items():
        if r.get("skipped"):
            rows[name] = {"skipped": True, "reason": r["reason"]}
        else:
            where = {"path": r["path"]} if "path" in r else {"repo_id": r.get("repo_id")}
            rows[name] = {**where, "skipped": False, "seconds": r.get("seconds", 0.0)}
    return rows


def _lockable(result: dict[str, Any]) -> dict[str, Any]:
    """The parts of a stage's result worth recording (small, JSON-friendly)."""
    return {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


def _summary(console, folder: RunFolder, results: dict[str, Any]) -> None:
    table = Table(title="run summary", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("peak RSS", justify="right")  # the process's, up to the stage's end
    for name, r in results.items():
        status = escape(f"skipped ({r.get('reason')})") if r.get("skipped") else "ran"
        ran = not r.get("skipped")
        rss = f"{r['peak_rss_mb']:,} MiB" if ran and r.get("peak_rss_mb") else ""
        table.add_row(name, status, f"{r.get('seconds', 0):.1f} s" if ran else "", rss)
    console.print(table)
    where = [
        ("weights", folder.controlnet),
        ("samples", folder.samples),
        ("model card", folder.model_card),
        ("dataset", folder.dataset),
        ("lock", folder.lock),
        ("log", folder.log),
    ]
    for label, path in where:
        if path.exists():
            console.print(f"  {label:<11} {escape(str(path))}")


def evaluate_run(run_dir: Path, *, quiet: bool = False) -> dict[str, Any]:
    """`recipe evaluate RUN_DIR`: evaluate a finished run with the recipe it recorded."""
    from recipe_runner.evaluate import evaluate_folder

    folder = RunFolder(Path(run_dir))
    loaded, lock = load_run_recipe(folder)
    with exclusive(folder), run_console(folder.log, quiet=quiet) as console:
        result = evaluate_folder(loaded, folder, console=console)
        lock.setdefault("stages", {})["evaluate"] = {**_lockable(result), "skipped": False}
        write_lock(folder.lock, lock)
    return result
