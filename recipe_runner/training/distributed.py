"""Which rank this is, and rank 0's word to the others, when the user ran `accelerate launch` themselves.

Rank 0 runs the stages as usual (dataset, preparation, then training together with the others);
every other rank waits until rank 0 says whether there is training to join (`announce`), then joins it
through the worker entry point `launch.num_processes` uses (training/worker.py `follow`). So the dataset
and caches are still built once, before any worker trains, and only rank 0 prints and writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.runfolder.atomic import write_text
from recipe_runner.runfolder.layout import RunFolder

SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate launch sets ACCELERATE_USE_<NAME>=true


def check_launch(recipe_file: str) -> None:
    """A run started by the user's `accelerate launch` trains as one run, or stops before writing.

    With several processes and no GPU, accelerate forms no process group unless told to use the CPU
    (each process would train alone, into the same folder): say so for it, as `launch.num_processes`
    does. Asked for several processes without `--multi_gpu`, accelerate starts only one (its simple
    launcher, which sets MASTER_ADDR for the processes it does not start): refuse with the command
    that starts them. A launch that asks accelerate for FSDP or DeepSpeed is refused too: the session
    would wrap the ControlNet in a strategy its checkpoints, EMA and final save were never tested with."""
    asked = [
        name for name in SHARDED if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")
    ]
    if asked:
        raise UserError(
            f"accelerate launch asked for {' and '.join(asked)} (--use_{asked[0].lower()} or the config "
            "file's distributed_type); recipe-runner trains with DDP only so far",
            hint=f"accelerate launch --multi_gpu --num_processes N -m recipe_runner train {recipe_file}, "
            "or set launch.num_processes: N in the recipe",
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch  # the stages import it anyway; only launched runs get here

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    if (
        "ACCELERATE_MIXED_PRECISION" in os.environ
        and "MASTER_ADDR" in os.environ
        and "RANK" not in os.environ
    ):
        raise UserError(
            "accelerate launch started one process although several were asked for (without --multi_gpu "
            "it starts just one, also on a CPU)",
            hint=f"accelerate launch --multi_gpu --num_processes N -m recipe_runner train {recipe_file} "
            "(on a machine without a GPU too: it starts N gloo processes), or set launch.num_processes: N "
            f"in the recipe and run `recipe run {recipe_file}`",
        )


def launched_rank() -> int | None:
    """This process's rank when started by accelerate/torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("RANK", "0"))


def signal_file(folder: RunFolder) -> Path:
    # Every rank of one launch shares the launcher as parent: its pid names this launch's file, so a
    # file left by an earlier launch is never mistaken for this one's.
    return folder.root / f".launch-{os.getppid()}.json"


def announce(folder: RunFolder, *, train: bool, error: str | None = None) -> None:
    """Rank 0: tell the waiting ranks whether to join training (or that preparation failed)."""
    current = signal_file(folder)
    for old in folder.root.glob(".launch-*.json"):  # earlier launches' files
        if old != current:
            old.unlink(missing_ok=True)
    write_text(current, json.dumps({"train": train, "error": error}))


def announced(folder: RunFolder) -> bool:
    """Whether rank 0 of this launch has already told the other ranks what to do."""
    return signal_file(folder).exists()
