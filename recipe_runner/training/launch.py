"""Training in several processes: `accelerate launch` runs training/worker.py's `worker_main` N times.

The orchestrating process prepares what must happen once (the base model), writes `train-launch.json`
(the resolved recipe, where it came from, the resolved base) into the run folder, launches the workers
(they share the precompute: training/precompute.py, Shard) and waits. Rank 0 writes `train-result.json`
(results, or the error to re-raise here with its type), so the caller sees the same results and
exceptions as a one-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console

import recipe_runner
from recipe_runner.errors import Interrupted, RunFailed, UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import write_text
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.runfolder.log import shows_on_terminal
from recipe_runner.training.keys import effective_precision

LAUNCH_FILE = "train-launch.json"
RESULT_FILE = "train-result.json"
STOP_FILE = "train-stop"  # written by the launching process to ask the workers to stop
ERRORS = {"UserError": UserError, "RunFailed": RunFailed, "Interrupted": Interrupted}


def launch_command(loaded: LoadedRecipe, folder: RunFolder, *, resume: bool) -> list[str]:
    launch = loaded.recipe.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config:
        cmd += ["--config_file", str(loaded.resolve(launch.accelerate_config))]
    # accelerate counts processes over all machines; --multi_gpu selects torch.distributed.run, which
    # also gives CPU-only machines one gloo process each (accelerate's --cpu would start just one).
    cmd += ["--multi_gpu", "--num_processes", str(launch.total_processes)]
    cmd += [
        "--num_machines",
        str(launch.num_machines),
        "--mixed_precision",
        effective_precision(loaded.recipe),
    ]
    cmd += ["--dynamo_backend", "no"]
    if launch.main_process_port:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    cmd += ["-m", "recipe_runner.training.worker", str(folder.root.resolve())]
    return cmd + (["--resume"] if resume else [])


def _environment() -> dict[str, str]:
    env = os.environ.copy()
    # Workers must import this very package, also when it is not installed (tests, a source checkout).
    src = str(Path(recipe_runner.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    if not torch.cuda.is_available():
        # Without this accelerate sees no GPU and trains each process alone instead of with gloo.
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    return env


def _wait(launcher: subprocess.Popen, stop_file: Path, console: Console | None) -> tuple[int, bool]:
    """Wait for the workers. The launcher has a session of its own, so a terminal's Ctrl-C reaches only
    this process: torch's agent, which answers a signal with a traceback, and workers still importing
    torch, which would die with one, get none. A first Ctrl-C or SIGTERM writes `stop_file`, which the
    workers check at each step (they finish it, write a checkpoint and exit); a second Ctrl-C stops
    them all at once. Returns (exit code, whether a stop was asked for)."""
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping and signum == signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            raise KeyboardInterrupt
        if not stopping:
            write_text(stop_file, f"{signal.Signals(signum).name}\n")
            if console is not None:
                console.print(
                    f"[yellow]{signal.Signals(signum).name}: the training processes stop after this step "
                    "and write a checkpoint (Ctrl-C again to stop at once, without one)[/]"
                )
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.wait(), stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)  # a later run in this folder must not find it


def write_launch_spec(
    loaded: LoadedRecipe, folder: RunFolder, base: str, *, log: bool, terminal: bool
) -> None:
    """What every worker needs to rebuild the recipe and find the prepared base (read by worker_main);
    `log`: rank 0 appends what it prints to log.txt, as a one-process run does; `terminal`: and shows it."""
    spec = {
        "recipe_path": str(loaded.path.resolve()),
        "recipe": loaded.recipe.resolved_dict(),
        "base": base,
        "log": log,
        "terminal": terminal,
    }
    write_text(folder.root / LAUNCH_FILE, json.dumps(spec, indent=2))


def launch_workers(
    loaded: LoadedRecipe,
    folder: RunFolder,
    base: str,
    *,
    resume: bool = False,
    console: Console | None = None,
) -> dict:
    """Train in launch.num_processes (x num_machines) processes; same results and errors as one process.
    `base`: the prepared base (training.stage.prepare_training ran here, before any worker starts)."""
    write_launch_spec(loaded, folder, base, log=console is not None, terminal=shows_on_terminal(console))
    result_file = folder.root / RESULT_FILE
    result_file.unlink(missing_ok=True)
    cmd = launch_command(loaded, folder, resume=resume)
    if console is not None:
        console.print(f"[dim]launching {loaded.recipe.launch.num_processes} training processes[/]")
    stop_file = folder.root / STOP_FILE
    stop_file.unlink(missing_ok=True)
    launcher = subprocess.Popen(cmd, env=_environment(), start_new_session=True)
    code, stopped = _wait(launcher, stop_file, console)
    try:
        outcome = json.loads(result_file.read_text())
    except (OSError, ValueError):
        if stopped:
            raise Interrupted("stopped before training began: no checkpoint was written") from None
        raise RunFailed(
            f"the training processes exited with code {code} without a result; see the output above",
            log=str(folder.log),
        ) from None
    if "results" in outcome:
        return outcome["results"]
    error = ERRORS.get(outcome.get("type"), RunFailed)
    if error is UserError:
        raise UserError(outcome["message"], hint=outcome.get("hint"))
    if error is RunFailed:
        raise RunFailed(outcome["message"], log=outcome.get("log") or str(folder.log))
    raise Interrupted(outcome["message"])


def report_outcome(run_dir: Path, main: bool, outcome: dict) -> None:
    """Rank 0 of the workers: the results, or the error, for the launching process (`launch_workers`)."""
    if main:
        write_text(run_dir / RESULT_FILE, json.dumps(outcome, indent=2, default=str))
