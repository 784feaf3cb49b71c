"""Resumable checkpoints: accelerate's state plus where in the data the run was, complete or absent.

`checkpoints/step-N/` holds accelerator.save_state's files (ControlNet, optimizer, lr scheduler, RNG)
and `state.json` (optimizer step, micro-step, epoch, the recipe fields it depends on). The folder gets
its name only when complete (runfolder/atomic.py), and old ones are removed only after a new one is.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from recipe_runner.errors import RunFailed, UserError
from recipe_runner.runfolder.atomic import atomic_dir, is_complete, remove_stale_temporaries
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.training.keys import changed_fields, comparable

STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")

Say = Callable[[str], None]


def list_checkpoints(folder: RunFolder) -> list[tuple[int, Path]]:
    """(step, path) of every step-N folder, oldest first, complete or not."""
    if not folder.checkpoints.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.checkpoints.iterdir()
        if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, folder: RunFolder, state: dict) -> Path:
    """Write checkpoints/step-N atomically; every process must call this (each saves its RNG state)."""
    target = folder.checkpoint(state["global_step"])
    if not accelerator.is_main_process:
        (path,) = broadcast_object_list([None])
        accelerator.save_state(path)
        accelerator.wait_for_everyone()
        return target
    with atomic_dir(target) as tmp:
        if accelerator.num_processes > 1:
            broadcast_object_list([str(tmp)])
        accelerator.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        # The other processes must have written their files before the folder gets its final name.
        accelerator.wait_for_everyone()
    return target


def prune(folder: RunFolder, limit: int | None, say: Say) -> None:
    """Keep the newest `limit` complete checkpoints (called after a new one is complete)."""
    if limit is None:
        return
    complete = [(step, p) for step, p in list_checkpoints(folder) if is_complete(p)]
    for step, path in complete[: max(0, len(complete) - limit)]:
        shutil.rmtree(path, ignore_errors=True)
        say(f"[dim]removed checkpoint step-{step} (checkpoints_total_limit: {limit})[/]")


def clear_for_fresh_start(folder: RunFolder, say: Say) -> None:
    """A run started without --resume replaces an earlier run's checkpoints, so that a later --resume
    can never continue from a checkpoint of a different run."""
    old = list_checkpoints(folder)
    remove_stale_temporaries(folder.checkpoints)
    if not old:
        return
    for _, path in old:
        shutil.rmtree(path, ignore_errors=True)
    say(
        f"[yellow]removed {len(old)} checkpoint(s) of an earlier run from {folder.checkpoints} "
        "(pass --resume to continue from them instead)[/]"
    )


def resume(accelerator: Accelerator, folder: RunFolder, fields: dict, say: Say) -> dict | None:
    """Load the newest loadable checkpoint into the prepared objects and return its state.json, or None
    when there is none (start fresh). A checkpoint of a different recipe is a UserError."""
    remove_stale_temporaries(folder.checkpoints)
    candidates = list(reversed(list_checkpoints(folder)))
    if not candidates:
        say(f"no checkpoint in {folder.checkpoints}: starting from step 0")
        return None
    tried_loading = False
    for step, path in candidates:
        if not is_complete(path):
            say(f"[yellow]checkpoint step-{step} is incomplete (no {path.name}/.complete): skipping it[/]")
            continue
        try:
            state = json.loads((path / STATE_FILE).read_text())
            saved_fields = state["resume_fields"]
        except (OSError, ValueError, KeyError) as e:
            say(f"[yellow]checkpoint step-{step}: unreadable {STATE_FILE} ({e}); trying the previous one[/]")
            continue
        changes = changed_fields(comparable(saved_fields), comparable(fields))
        if changes:
            raise UserError(
                f"checkpoint step-{step} in {folder.checkpoints} was made with a different recipe; changed: "
                + "; ".join(changes),
                hint="restore those values to resume, or run without --resume to start over "
                "(max_steps, validation and checkpoint settings may change between resumes)",
            )
        tried_loading = True
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # any unreadable file means: use the previous one
            say(
                f"[yellow]checkpoint step-{step} could not be loaded ({type(e).__name__}: {e}): "
                "trying the previous one[/]"
            )
            continue
        say(f"resuming from checkpoint step-{step} ({path})")
        return {**state, "path": str(path)}
    if tried_loading:
        raise RunFailed(
            f"no checkpoint in {folder.checkpoints} could be loaded; see the messages above",
            log=str(folder.log),
        )
    say(f"no complete checkpoint in {folder.checkpoints}: starting from step 0")
    return None


def realign_schedule(scheduler: Any, optimizer: Any, scheduler_steps: int) -> None:
    """Set the learning-rate schedule's clock to `scheduler_steps`. The prepared scheduler steps once per
    process per optimizer step (as the reference's does), over a schedule stretched by the process count:
    a checkpoint from another count holds another clock, and this puts it where the new count expects,
    so each optimizer step keeps the uninterrupted run's learning rate."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper around the LambdaLR
    if not hasattr(inner, "lr_lambdas"):  # every schedule diffusers' get_scheduler makes is a LambdaLR
        return
    inner.last_epoch = scheduler_steps
    lrs = [base * fn(scheduler_steps) for base, fn in zip(inner.base_lrs, inner.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    inner._last_lr = lrs
