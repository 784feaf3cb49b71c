"""One training process of several: `python -m recipe_runner.training.worker RUN_DIR [--resume]` is what
`launch.num_processes` has `accelerate launch` run per process, and `follow` is how ranks > 0 of the
user's own `accelerate launch` join rank 0. Both read rank 0's `train-launch.json` (training/launch.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from recipe_runner.errors import Interrupted, RunFailed, UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.runfolder.log import run_console
from recipe_runner.training.distributed import launched_rank, signal_file
from recipe_runner.training.launch import ERRORS, LAUNCH_FILE, STOP_FILE, report_outcome
from recipe_runner.training.stage import run_training


def worker_main(run_dir: Path, resume: bool = False) -> dict | None:
    """One launched training process: rebuild the recipe from `train-launch.json`, train, and (rank 0)
    write `train-result.json` for the launching process. Errors are written there too, then re-raised,
    so the process exits with their code (`main` maps them)."""
    run_dir = Path(run_dir)
    spec = json.loads((run_dir / LAUNCH_FILE).read_text())
    recipe = Recipe.model_validate(spec["recipe"])
    # Relative paths in the recipe resolve against the recipe file's folder, as in the parent.
    loaded = LoadedRecipe(recipe, Path(spec["recipe_path"]), spec["recipe"], {})
    # Not PartialState(): created before the Accelerator, it would ignore ACCELERATE_USE_CPU.
    main = int(os.environ.get("RANK", "0")) == 0
    folder = RunFolder(run_dir)
    try:
        with contextlib.ExitStack() as stack:
            console = None
            if main and spec.get("log"):
                console = stack.enter_context(run_console(folder.log, quiet=not spec.get("terminal")))
            results = run_training(
                loaded,
                folder,
                resume=resume,
                console=console,
                base=spec["base"],
                stop_file=run_dir / STOP_FILE,
            )
    except (UserError, RunFailed, Interrupted) as e:
        kind = next(name for name, cls in ERRORS.items() if isinstance(e, cls))
        outcome = {"type": kind, "message": e.message if hasattr(e, "message") else str(e)}
        report_outcome(
            run_dir, main, {**outcome, "hint": getattr(e, "hint", None), "log": getattr(e, "log", None)}
        )
        raise
    except Exception as e:
        report_outcome(
            run_dir,
            main,
            {"type": "RunFailed", "message": f"training process failed: {type(e).__name__}: {e}"},
        )
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report_outcome(run_dir, main, {"results": results})
    return results


def follow(folder: RunFolder, *, resume: bool) -> dict[str, Any]:
    """Ranks > 0: wait for rank 0's preparation, then train with it (or leave)."""
    signal = signal_file(folder)
    while not signal.exists():
        time.sleep(0.5)
    message = json.loads(signal.read_text())
    if message.get("error"):
        raise RunFailed(f"rank 0 stopped before training: {message['error']}")
    if not message.get("train"):
        return {"run_dir": str(folder.root), "stages": {}}
    worker_main(folder.root, resume=resume)
    return {"run_dir": str(folder.root), "stages": {"train": {"rank": launched_rank()}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe_runner.training.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        worker_main(args.run_dir, args.resume)
    except Interrupted:
        # Every rank stops at the same step (they agree on it), and the launching process reads the outcome
        # from train-result.json and exits 130 itself: a 0 here keeps torch's agent from reporting a failure.
        return 0
    except (UserError, RunFailed) as e:
        # Already reported through train-result.json; non-zero, so that the agent stops the other ranks.
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
