"""The semantic difference of two resolved recipes, and what it means for a run.

Compares `Recipe.resolved_dict()` (extends, defaults and `--set` applied), so reordered keys,
comments and defaults written out explicitly make no difference. Torch-free: `recipe diff`
and `recipe plan` use it before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from recipe_runner.data.buckets import global_batch
from recipe_runner.recipe.condition import AnnotatorCondition, Condition
from recipe_runner.recipe.effects import effect_of, switch_of
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.run.estimates import estimate_memory

SECTIONS: tuple[str, ...] = (
    "condition", "dataset", "model", "train", "logging", "launch", "evaluate", "output", "top-level",
)  # fmt: skip
# Condition types whose annotator needs weights: the recipe's condition registry says which.
ANNOTATOR_CONDITIONS = frozenset(
    m.model_fields["type"].default
    for m in get_args(get_args(Condition)[0])
    if issubclass(m, AnnotatorCondition)
)


@dataclass(frozen=True)
class Change:
    """One field that differs; `kind` is changed, added (only in B) or removed (only in A)."""

    path: tuple[str, ...]
    old: Any
    new: Any
    kind: str = "changed"

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return self.path[0] if len(self.path) > 1 and self.path[0] in SECTIONS else "top-level"

    @property
    def field(self) -> str:
        """The path inside its section (what a table row names)."""
        return ".".join(self.path[1:]) if self.section != "top-level" else self.dotted

    def to_dict(self) -> dict:
        return {
            "path": self.dotted,
            "section": self.section,
            "kind": self.kind,
            "old": self.old,
            "new": self.new,
        }


def stage_of(path: tuple[str, ...], computes_condition: bool = True) -> str | None:
    """The first stage a change to `path` invalidates, as its field declares (recipe/effects.py): dataset,
    train, evaluate, or None (nothing reruns). A field this version lacks takes its section's effect.

    `computes_condition`: the dataset makes conditioning images with `condition` (the data has none);
    otherwise the condition is only used by evaluation."""
    stage = effect_of(path, strict=False).invalidates
    if stage == "dataset" and path[0] == "condition" and not computes_condition:
        return "evaluate"
    return None if stage == "nothing" else stage


def computes_condition(recipe: Recipe) -> bool:
    """Whether the dataset stage makes conditioning images (as data/build.py decides)."""
    spec = recipe.dataset
    return spec.columns.conditioning_image is None and spec.source.conditioning_dir is None


def diff_data(a: Any, b: Any, prefix: tuple[str, ...] = ()) -> list[Change]:
    """Field-by-field differences of two plain-data trees; lists compare as whole values."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes: list[Change] = []
        for key in list(a) + [k for k in b if k not in a]:
            path = (*prefix, str(key))
            if key not in b:
                changes.append(Change(path, a[key], None, "removed"))
            elif key not in a:
                changes.append(Change(path, None, b[key], "added"))
            else:
                changes.extend(diff_data(a[key], b[key], path))
        return changes
    # 1 and 1.0 are the same learning rate; bool is an int subclass, so compare types for it.
    same = a == b and (isinstance(a, bool) == isinstance(b, bool))
    return [] if same else [Change(prefix, a, b)]


def list_delta(old: Any, new: Any) -> tuple[list, list] | None:
    """Items removed and added when both sides are lists (e.g. validation prompts), else None."""
    if not (isinstance(old, list) and isinstance(new, list)):
        return None
    return [x for x in old if x not in new], [x for x in new if x not in old]


@dataclass(frozen=True)
class Implication:
    """What a difference means for a run; `level` orders them: rebuild > retrain > info."""

    code: str
    text: str
    level: str = "info"

    def to_dict(self) -> dict:
        return {"code": self.code, "level": self.level, "text": self.text}


@dataclass
class RecipeDiff:
    changes: list[Change]
    implications: list[Implication] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.changes

    def by_section(self) -> dict[str, list[Change]]:
        groups: dict[str, list[Change]] = {s: [] for s in SECTIONS}
        for c in self.changes:
            groups[c.section].append(c)
        return {s: cs for s, cs in groups.items() if cs}

    def to_dict(self) -> dict:
        return {
            "identical": self.identical,
            "changes": [c.to_dict() for c in self.changes],
            "implications": [i.to_dict() for i in self.implications],
        }


def diff_recipes(a: Recipe, b: Recipe, dirs: tuple[Path | None, Path | None] = (None, None)) -> RecipeDiff:
    """Every field that differs between two resolved recipes, and what it implies.

    `dirs`: the recipes' folders, against which local model paths resolve (for the memory estimate)."""
    changes = diff_data(a.resolved_dict(), b.resolved_dict())
    return RecipeDiff(changes, implications(a, b, changes, dirs) if changes else [])


def _leaves(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(data, dict) and data:
        return [leaf for k, v in data.items() for leaf in _leaves(v, (*prefix, str(k)))]
    return [(prefix, data)]


def new_recipe(b: Recipe, base_dir: Path | None = None) -> RecipeDiff:
    """A recipe with nothing to compare with (added since the base revision of `recipe diff --git`): every
    resolved field as added, and what a run of it takes."""
    changes = [Change(path, None, value, "added") for path, value in _leaves(b.resolved_dict())]
    found = [
        Implication("new-recipe", "new recipe: nothing to compare with, every stage runs", "rebuild"),
        Implication("effective-batch", f"effective batch {b.images_per_step}"),
        Implication("learning-rate", f"learning rate {b.train.learning_rate:g}"),
        Implication("steps", f"training length {_length(b)}"),
        Implication(
            "memory", f"estimated accelerator memory ≈ {estimate_memory(b, base_dir).total_gb:.1f} GB"
        ),
    ]
    return RecipeDiff(changes, found)


def ratio(old: float, new: float) -> str:
    """`×2`, `÷2` or `×1.5`: how a positive quantity scaled."""
    r = new / old
    return f"×{r:.3g}" if r >= 1 else f"÷{1 / r:.3g}"


def precision(r: Recipe) -> str:
    return r.launch.mixed_precision or r.train.mixed_precision


def _length(r: Recipe) -> str:
    t = r.train
    return f"{t.max_steps} steps" if t.max_steps is not None else f"{t.num_epochs} epochs"


def _condition_needs(kind: str) -> str:
    if kind in ANNOTATOR_CONDITIONS:
        return "needs annotator weights"
    if kind == "mediapipe_face":
        return "needs the `face` extra"
    if kind == "custom":
        return "runs your function on every image"
    return "no weights needed"


def _switched_off(c: Change, a: Recipe, b: Recipe) -> bool:
    """A change inside a section that counts only while switched on (bucketing), off on both sides."""
    switch = switch_of(c.path)
    return switch is not None and not any(_value(r.resolved_dict(), switch) for r in (a, b))


def _value(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _stage_summary(stages: list[tuple[Change, str | None]], same_rows: bool = False) -> Implication:
    """The headline: what reruns. `stages`: each change with the stage it invalidates (stage_of)."""
    changes = [c for c, _ in stages]
    found = {s for _, s in stages}
    if "dataset" in found:
        fields = [c.dotted for c, s in stages if s == "dataset"]
        shown = ", ".join(fields[:4]) + (f" and {len(fields) - 4} more" if len(fields) > 4 else "")
        return Implication(
            "rebuild", f"dataset will rebuild ({shown}); training restarts from scratch", "rebuild"
        )
    train = [effect_of(c.path, strict=False) for c, s in stages if s == "train"]
    # Batch size and process count resume across a move that keeps the rows per micro-step.
    moved = same_rows and any(e.same_rows for e in train)
    if train and moved and all(e.same_rows or e.resumable for e in train):
        return Implication(
            "retrain-resumable",
            "training reruns on another process count with the same rows per micro-step (--resume "
            "continues from the newest checkpoint as if uninterrupted); dataset reused",
            "retrain",
        )
    if train and all(e.resumable for e in train):
        return Implication(
            "retrain-resumable",
            "training reruns (only its length/validation changed: --resume continues from the newest "
            "checkpoint); dataset reused",
            "retrain",
        )
    if train:
        return Implication("retrain", "training restarts from scratch; dataset reused", "retrain")
    if "evaluate" in found:
        return Implication(
            "reevaluate",
            "only evaluation settings changed: dataset and trained weights reused "
            "(`recipe evaluate RUN_DIR` recomputes the scores)",
        )
    # Name the section when all of it is bookkeeping (output, logging), else the fields themselves.
    whole = {"output", "logging", "evaluate"}
    sections = "/".join(dict.fromkeys(c.section if c.section in whole else c.dotted for c in changes))
    return Implication("no-retrain", f"only {sections} changed: no retraining")


def implications(
    a: Recipe, b: Recipe, changes: list[Change], dirs: tuple[Path | None, Path | None] = (None, None)
) -> list[Implication]:
    """What the differences mean, most consequential first."""
    same_rows = global_batch(a) == global_batch(b)
    computes = computes_condition(a) or computes_condition(b)
    stages = [(c, None if _switched_off(c, a, b) else stage_of(c.path, computes)) for c in changes]
    found = [_stage_summary(stages, same_rows)]

    def add(code: str, text: str) -> None:
        found.append(Implication(code, text))

    if a.images_per_step != b.images_per_step:
        add("effective-batch", f"effective batch {a.images_per_step} → {b.images_per_step}")
    ta, tb = a.train, b.train
    if ta.learning_rate != tb.learning_rate:
        add(
            "learning-rate",
            f"learning rate {ratio(ta.learning_rate, tb.learning_rate)} "
            f"({ta.learning_rate:g} → {tb.learning_rate:g})",
        )
    if tb.scale_lr or ta.scale_lr:
        # With scale_lr the optimizer sees lr × effective batch, so that product is what matters.
        lr_a = ta.learning_rate * (a.images_per_step if ta.scale_lr else 1)
        lr_b = tb.learning_rate * (b.images_per_step if tb.scale_lr else 1)
        if lr_a != lr_b:
            add(
                "effective-learning-rate",
                f"effective learning rate {ratio(lr_a, lr_b)} ({lr_a:g} → {lr_b:g})",
            )
    if (ta.max_steps, ta.num_epochs) != (tb.max_steps, tb.num_epochs):
        if ta.max_steps is not None and tb.max_steps is not None:
            add("steps", f"steps {ta.max_steps} → {tb.max_steps}")
        else:
            add("steps", f"training length {_length(a)} → {_length(b)}")
    if precision(a) != precision(b):
        add("precision", f"precision {precision(a)} → {precision(b)}")
    if a.condition.type != b.condition.type:
        add(
            "condition-type",
            f"condition type changed: {a.condition.type} → {b.condition.type} "
            f"({_condition_needs(b.condition.type)})",
        )
    fa, fb = a.model.resolved_family, b.model.resolved_family
    if fa != fb:
        add("family", f"model family changed {fa} → {fb}")
    elif a.model.base != b.model.base:
        add("base-model", f"base model {a.model.base} → {b.model.base} (same family: {fb})")
    if a.dataset.resolution != b.dataset.resolution:
        add(
            "resolution",
            f"resolution {a.dataset.resolution} → {b.dataset.resolution} px "
            f"(activation memory and step time {ratio(a.dataset.resolution**2, b.dataset.resolution**2)})",
        )
    if a.seed != b.seed:
        add("seed", f"seed {a.seed} → {b.seed}: different data order, crops and noise")
    ga, gb = estimate_memory(a, dirs[0]).total_gb, estimate_memory(b, dirs[1]).total_gb
    if abs(gb - ga) > 0.05 * max(ga, gb):
        add("memory", f"estimated accelerator memory ≈ {ga:.1f} → {gb:.1f} GB")
    if a.output_dir != b.output_dir:
        add("run-folder", f"run folder {a.output_dir} → {b.output_dir} (nothing is cached in a new folder)")
    return found
