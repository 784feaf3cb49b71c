"""`recipe plan`: which stages would run, which are cached and why, and what the run would cost.

Answers from the recipe and a few file stats, in well under a second: no weights are loaded, no data
is read (row counts come from parquet metadata, line counts or directory listings), nothing imports
torch — except with `trace=True` (`recipe plan --trace`), which traces the training step's peak memory
on fake tensors (training/memory_trace.py: torch, the models' configs, seconds). Stages, their order
and whether their outputs are current come from the registry in `run/pipeline.py` (each stage's `status`
is cheap by contract); comparing the recipe with the one the run folder recorded names the fields that
changed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recipe_runner.data.buckets import dataset_buckets, global_batch, small_buckets
from recipe_runner.recipe.effects import STAGES
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.run.diff import Change, computes_condition, diff_data, stage_of
from recipe_runner.run.estimates import (
    CARD_SIZES_GB,
    MemoryEstimate,
    TimeEstimate,
    estimate_memory,
    estimate_time,
    fits_card,
    lora_trainable,
    memory_savers,
)
from recipe_runner.run.lockfile import read_lock
from recipe_runner.run.notes import learning_rate_note, resolution_note
from recipe_runner.run.publish import PublishStep, publish_plan
from recipe_runner.run.rows import RowCount, count_rows
from recipe_runner.run.safety import run_root
from recipe_runner.runfolder.atomic import is_complete
from recipe_runner.runfolder.layout import RunFolder

# Each stage reruns when a change invalidates it or an earlier stage (diff.stage_of, recipe/effects.py);
# evaluation settings alone leave the scores to `recipe evaluate`: `recipe run` keeps them.
INVALIDATED_BY = {stage: set(STAGES[: i + 1]) - {"evaluate"} for i, stage in enumerate(STAGES)}


@dataclass
class StagePlan:
    name: str
    runs: bool
    reason: str
    changes: list[Change] = field(default_factory=list)

    def to_dict(self) -> dict:
        status = "would run" if self.runs else "cached"
        return {
            "name": self.name,
            "status": status,
            "reason": self.reason,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclass
class Plan:
    name: str
    run_dir: str
    stages: list[StagePlan]
    rows: RowCount
    train_rows: int | None
    effective_batch: int
    steps: int | None
    memory: MemoryEstimate
    memory_savers: list[str]
    memory_with_savers_gb: float | None
    time: TimeEstimate
    warnings: list[str]
    traced: dict | None = None  # `--trace`: memory_trace.trace_recipe's figures, with total_gb and fits
    buckets: dict[str, int | None] | None = None  # `WxH`: train rows (None until the dataset is built)
    lora_trainable: float | None = None  # train.lora: the ControlNet's trained parameters
    publish: list[PublishStep] = field(default_factory=list)  # output.export and output.push_to_hub
    precomputes: bool = False  # train.precompute, for a built dataset

    @property
    def epochs(self) -> float | None:
        if self.steps is None or not self.train_rows:
            return None
        return self.steps * self.effective_batch / self.train_rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_dir": self.run_dir,
            "stages": [s.to_dict() for s in self.stages],
            "publish": [s.to_dict() for s in self.publish],
            "dataset": {**self.rows.to_dict(), "train_rows": self.train_rows, "buckets": self.buckets},
            "effective_batch": self.effective_batch,
            "precompute": self.precomputes,
            "lora_trainable_params": self.lora_trainable,
            "steps": self.steps,
            "epochs": round(self.epochs, 2) if self.epochs is not None else None,
            "memory": {
                **self.memory.to_dict(),
                "estimate": True,
                "savers": self.memory_savers,
                "with_savers_gb": self.memory_with_savers_gb,
                "traced": self.traced,
            },
            "time": {**self.time.to_dict(), "estimate": True},
            "warnings": self.warnings,
        }


def recorded_recipe(folder: RunFolder) -> tuple[dict | None, str]:
    """The resolved recipe the folder's outputs were made with, and the file it was read from.

    The lock is written only after a stage succeeds, so it wins over recipe.resolved.yaml, which a run
    writes before its first stage (and keeps even when that stage fails)."""
    lock = read_lock(folder.lock)
    if lock and isinstance(lock.get("recipe"), dict):
        return _with_defaults(lock["recipe"]), folder.lock.name
    try:
        data = yaml.safe_load(folder.resolved_recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None, ""
    return (_with_defaults(data), folder.resolved_recipe.name) if isinstance(data, dict) else (None, "")


def _with_defaults(data: dict) -> dict:
    # Fields added to the format since the folder was written compare as their defaults, not as changes.
    try:
        return Recipe.model_validate(data).resolved_dict()
    except ValidationError:
        return data


def _describe(changes: list[Change], limit: int = 3) -> str:
    def one(c: Change) -> str:
        if c.kind == "added":
            return f"{c.dotted} added"
        if c.kind == "removed":
            return f"{c.dotted} removed"
        return f"{c.dotted} changed {_short(c.old)} → {_short(c.new)}"

    text = "; ".join(one(c) for c in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def _short(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def stage_plans(loaded: LoadedRecipe, folder: RunFolder) -> list[StagePlan]:
    """Each enabled stage in registry order: would it run, and why (or why not).

    Whether a stage is current is the stage's own `status` (its cache key, cheap and torch-free by the
    registry's contract); the fields that changed since the recorded recipe name the reason."""
    from recipe_runner.run.pipeline import STAGES, RunContext

    recorded, source = recorded_recipe(folder)
    computes = computes_condition(loaded.recipe)
    changes = diff_data(recorded, loaded.recipe.resolved_dict()) if recorded is not None else []
    ctx = RunContext(loaded, folder, None, read_lock(folder.lock), {})
    plans: list[StagePlan] = []
    # A stage whose outputs exist but are stale is explained by the fields that changed; a stage with no
    # outputs yet by its own words ("no dataset yet").
    for name, stage in STAGES.items():
        if not stage.enabled(ctx):
            continue
        mine = [c for c in changes if stage_of(c.path, computes) in INVALIDATED_BY.get(name, {name})]
        upstream = next((p for p in reversed(plans) if p.runs), None)
        if upstream is not None:
            plan = StagePlan(name, True, f"the {upstream.name} stage will run first")
        else:
            try:
                current, why = stage.status(ctx)
            except (ImportError, OSError, ValueError, KeyError):  # judge from the recorded recipe alone
                current = bool(source) and not mine
                why = (
                    f"inputs unchanged (compared with {source})" if source else "nothing recorded to compare"
                )
            built = stage.outputs(folder).exists()
            plan = StagePlan(name, not current, _describe(mine) if built and mine and not current else why)
            plan.changes = mine if built and not current else []
        if stage.reruns_on_resume and plan.runs and upstream is None:
            plan = _unfinished(folder, plan, mine)
        own = [c for c in changes if stage_of(c.path, computes) == name]
        if stage.refresh_hint and not plan.runs and own:
            plan.reason += f" ({_describe(own)}: {stage.refresh_hint.format(run=folder.root)})"
        ctx.results[name] = {"skipped": not plan.runs}
        plans.append(plan)
    return plans


def _unfinished(folder: RunFolder, plan: StagePlan, changes: list[Change]) -> StagePlan:
    """A train stage that will run: point at --resume when an interrupted run left checkpoints."""
    if is_complete(folder.controlnet) or not folder.checkpoints.is_dir():
        return plan
    steps = [
        int(n) for p in folder.checkpoints.glob("step-*") if (n := p.name[5:]).isdigit() and is_complete(p)
    ]
    if not steps:
        return plan
    if changes:  # resuming would mix settings: say what changed rather than suggest --resume
        return StagePlan(
            plan.name, True, f"unfinished, and since step {max(steps)}: {_describe(changes)}", changes
        )
    return StagePlan(plan.name, True, f"training did not finish; --resume continues from step {max(steps)}")


def _built_report(folder: RunFolder) -> dict | None:
    """A current built dataset's report.json, or None when it cannot be read."""
    try:
        report = json.loads((folder.dataset / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _built_rows(report: dict) -> tuple[RowCount, int | None] | None:
    """Source and training rows from the built dataset's report (exact, after dropped rows)."""
    rows_in, rows_out = report.get("rows_in"), report.get("rows_out")
    if not isinstance(rows_in, int):
        return None
    train = rows_out.get("train") if isinstance(rows_out, dict) else None
    return RowCount(rows_in, "the built dataset (dataset/report.json)"), (
        train if isinstance(train, int) else None
    )


def training_steps(recipe: Recipe, train_rows: int | None) -> int | None:
    """Optimizer steps: max_steps, or num_epochs × ceil(rows / effective batch)."""
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    if train_rows is None or t.num_epochs is None:
        return None
    return t.num_epochs * math.ceil(train_rows / recipe.images_per_step)


def make_plan(loaded: LoadedRecipe, output_dir: str | Path | None = None, *, trace: bool = False) -> Plan:
    recipe = loaded.recipe
    folder = RunFolder(run_root(loaded, output_dir))
    stages = stage_plans(loaded, folder)
    ds = recipe.dataset
    cached = next((not s.runs for s in stages if s.name == "dataset"), False)
    report = _built_report(folder) if cached else None
    rows, train_rows = (_built_rows(report) if report else None) or (count_rows(loaded), None)
    if train_rows is None and rows.rows is not None:
        train_rows = max(0, min(rows.rows, ds.max_samples or rows.rows) - ds.holdout)
    steps = training_steps(recipe, train_rows)
    memory = estimate_memory(recipe, loaded.base_dir)
    savers, lighter = memory_savers(recipe, loaded.base_dir)
    lighter_gb = round(estimate_memory(lighter, loaded.base_dir).total_gb, 2) if savers else None
    traced = _traced(loaded, memory) if trace else None
    need_gb = traced["total_gb"] if traced else memory.total_gb
    warnings = []
    if need_gb > CARD_SIZES_GB[0]:
        too_small = [c for c in CARD_SIZES_GB if c < need_gb]
        fits = fits_card(need_gb)
        where = (
            f"needs a card with {fits} GB or more" if fits else f"exceeds even {CARD_SIZES_GB[-1]} GB cards"
        )
        warnings.append(
            f"{'traced' if traced else 'estimated'} {need_gb:.1f} GB per process {where} "
            f"(too big for {'/'.join(map(str, too_small))} GB)"
        )
    if steps is None:
        warnings.append("steps unknown until the dataset size is known (num_epochs with an uncounted source)")
    if ds.source.streams:
        warnings.append(
            "streaming source: rows are read, processed (condition included) and VAE-encoded at every step, "
            "with no precompute cache; only the first rows are read before training (preview, holdout)"
        )
    if (note := resolution_note(loaded)) is not None:
        warnings.append(note)
    if (note := learning_rate_note(recipe)) is not None:
        warnings.append(note)
    if train_rows is not None and train_rows < recipe.images_per_step:
        warnings.append(f"only {train_rows} training rows for an effective batch of {recipe.images_per_step}")
    buckets = _buckets(loaded, report)
    running = [s.name for s in stages if s.runs]
    trains = "train" in running  # else the exports are named by the steps the lock recorded
    if buckets and (few := small_buckets(buckets, global_batch(recipe))):
        warnings.append(few)
    return Plan(
        name=recipe.name,
        run_dir=str(folder.root),
        stages=stages,
        rows=rows,
        train_rows=train_rows,
        effective_batch=recipe.images_per_step,
        steps=steps,
        memory=memory,
        memory_savers=savers if need_gb > CARD_SIZES_GB[0] else [],
        memory_with_savers_gb=lighter_gb,
        time=estimate_time(recipe, steps),
        warnings=warnings,
        traced=traced,
        buckets=buckets,
        lora_trainable=lora_trainable(recipe, memory.sizes) if recipe.train.lora is not None else None,
        precomputes=recipe.precomputes,
        publish=publish_plan(
            loaded, folder, read_lock(folder.lock), stages_run=running, steps=steps if trains else None
        ),
    )


def _buckets(loaded: LoadedRecipe, report: dict | None) -> dict[str, int | None] | None:
    """The recipe's buckets, with the built dataset's rows in each when there is a current one."""
    sizes = dataset_buckets(loaded.recipe.dataset)
    if not sizes:
        return None
    counts = (report or {}).get("buckets") or {}
    return {f"{w}x{h}": counts.get(f"{w}x{h}", 0 if counts else None) for w, h in sizes}


def _traced(loaded: LoadedRecipe, memory: MemoryEstimate) -> dict:
    """The training step traced on fake tensors (imports torch; seconds), plus what the trace leaves out:
    the estimate's CUDA overhead and, with several processes, DDP's copy of the gradients."""
    from recipe_runner.training.memory_trace import trace_recipe

    traced = trace_recipe(loaded)
    ddp = traced["controlnet_weights_gb"] if loaded.recipe.launch.total_processes > 1 else 0.0
    total = traced["peak_gb"] + ddp + memory.overhead_gb
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in traced.items()}
    rounded["phases_gb"] = {k: round(v, 3) for k, v in traced["phases_gb"].items()}
    return {
        **rounded,
        "ddp_buckets_gb": round(ddp, 3),
        "overhead_gb": memory.overhead_gb,
        "total_gb": round(total, 2),
        "fits_card_gb": fits_card(total),
    }
