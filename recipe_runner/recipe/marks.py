"""Markers on recipe fields: what a change to each means for a run (recipe/effects.py reads them).

The section models import them from here, and recipe/effects.py imports those models: the markers sit
apart so that neither needs the other at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["dataset", "train", "evaluate", "nothing"]
STAGES: tuple[Stage, ...] = ("dataset", "train", "evaluate")
"""Pipeline order: a change reruns the stage it invalidates and every later one."""


@dataclass(frozen=True)
class Effect:
    """What a change to a field makes stale, and whether a checkpoint survives it.

    `invalidates` and `resumable` pass on to the fields of a section; the other flags belong to the
    field that declares them."""

    invalidates: Stage
    """The first stage whose outputs a change makes stale: `dataset` (in the dataset cache key, so the
    training key changes too, through the data), `train` (in the training cache key), `evaluate` (only
    the evaluation scores: `recipe run` keeps them, `recipe evaluate` refreshes them) or `nothing` (speed
    or bookkeeping)."""
    resumable: bool
    """A checkpoint made before the change still resumes after it: the field is not among the resume
    fields a checkpoint is checked against."""
    omitted_at_default: bool = False
    """Added after runs were recorded: left out of the keys and resume fields while at its default, so
    those runs, caches and checkpoints stay current."""
    keyed_while: str | None = None
    """A section keyed (and resume-checked) only while this boolean field of it is true: off, its other
    settings change nothing."""
    same_rows: bool = False
    """A factor of the rows of one micro-step (train.batch_size × processes): a checkpoint resumes across
    a change that keeps their product."""

    def __post_init__(self) -> None:
        if self.invalidates in ("evaluate", "nothing") and not self.resumable:
            raise ValueError(f"a field that invalidates {self.invalidates} cannot refuse a checkpoint")


NOTHING = Effect("nothing", resumable=True)  # speed or bookkeeping: nothing reruns
REBUILDS = Effect("dataset", resumable=True)  # the rows change; a checkpoint is not checked against them
RETRAINS = Effect("train", resumable=False)
RESUMES = Effect("train", resumable=True)  # the outputs change, but --resume continues the checkpoint
REEVALUATES = Effect("evaluate", resumable=True)
RETRAINS_IF_SET = Effect("train", resumable=False, omitted_at_default=True)
RETRAINS_UNLESS_SAME_ROWS = Effect("train", resumable=False, same_rows=True)
