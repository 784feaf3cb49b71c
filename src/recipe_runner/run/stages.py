"""The stages a recipe turns into, registered by name in order; `run` and `plan` read this registry.

Each stage says whether its outputs are current (and why not) and runs. Heavy modules are
imported inside `run`, so the registry itself is cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console

from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.run.atomic import is_complete
from recipe_runner.run.folder import RunFolder


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
    announced: bool = False  # rank 0 of a user's `accelerate launch` told the other ranks to train


class Stage(Protocol):
    name: str

    def enabled(self, ctx: RunContext) -> bool: ...

    def status(self, ctx: RunContext) -> tuple[bool, str]:
        """(outputs current?, why) without doing the work."""
        ...

    def run(self, ctx: RunContext) -> dict[str, Any]: ...


class DatasetStage:
    name = "dataset"

    def enabled(self, ctx: RunContext) -> bool:
        return True

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


class TrainStage:
    name = "train"

    def enabled(self, ctx: RunContext) -> bool:
        return True

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
        from recipe_runner.run.distributed import announce, launched_rank
        from recipe_runner.run.resources import MEMORY_HINT
        from recipe_runner.training import prepare_training, train_controlnet

        try:
            prepared = prepare_training(ctx.loaded, ctx.folder, console=ctx.console)
            if launched_rank() == 0:  # the user ran `accelerate launch`: the other ranks join here
                from recipe_runner.training.launch import write_launch_spec

                write_launch_spec(ctx.loaded, ctx.folder, prepared.base, log=False, terminal=False)
                announce(ctx.folder, train=True)
                ctx.announced = True
                result = train_controlnet(ctx.loaded, ctx.folder, resume=ctx.resume, console=ctx.console)
            elif ctx.loaded.recipe.launch.num_processes > 1:
                from recipe_runner.training.launch import launch_workers

                result = launch_workers(ctx.loaded, ctx.folder, resume=ctx.resume, console=ctx.console)
            else:
                result = train_controlnet(ctx.loaded, ctx.folder, resume=ctx.resume, console=ctx.console)
        except torch.OutOfMemoryError as e:
            first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
            raise RunFailed(
                f"out of memory while training ({first}); {MEMORY_HINT}. Completed checkpoints are kept: "
                "add --resume to continue from the newest",
                log=str(ctx.folder.log),
            ) from None
        return {**result, "cache_key": self.key(ctx)}


class EvaluateStage:
    name = "evaluate"

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.loaded.recipe.evaluate.enabled

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
