"""What the user sees and does while training runs: the progress bar, the summary, Ctrl-C.

A first SIGINT/SIGTERM asks the loop to stop after the current optimizer step (it then writes a
checkpoint); a second SIGINT stops at once.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from recipe_runner.runfolder.events import reporter


class StopRequest:
    """Installs SIGINT/SIGTERM handlers for the duration of a `with` block (main thread only); with
    `stop_file`, that file's appearing asks for a stop too (how a launching process asks its workers)."""

    def __init__(self, console: Console | None, stop_file: Path | None = None):
        self.console = console
        self.stop_file = stop_file
        self._requested = False
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Read once per optimizer step: one stat() of the stop file at most."""
        if not self._requested and self.stop_file is not None and self.stop_file.exists():
            self._requested = True
            self._first = time.monotonic()
        return self._requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._requested:
            # A launcher forwarding the terminal's Ctrl-C delivers it twice within moments: only a
            # later, deliberate second Ctrl-C stops without a checkpoint.
            if signum == signal.SIGINT and now - self._first > 1.0:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        self._requested, self._first = True, now
        if self.console is not None:
            self.console.print(
                f"[yellow]{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                "(Ctrl-C again to stop at once, without one)[/]"
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class TrainingProgress:
    """A rich progress bar (step/total, loss, lr, it/s, ETA), and the same figures as the run's throttled
    progress lines (log.txt, a pipe, --json); silent without a console (ranks other than 0 have none)."""

    def __init__(self, console: Console | None, total: int, start: int):
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            disable=console is None,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", speed="")
        self.start, self.total = start, total
        self.started = time.perf_counter()
        self.report = reporter(console)
        self.report.progress("train", start, total, unit="step")  # starts its clock: rate and ETA

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, loss: float | None, lr: float) -> None:
        done = step - self.start
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}" if loss is not None else "nan",
            lr=f"{lr:.2e}",
            speed=f"{rate:.2f} it/s",
        )
        self.report.progress("train", step, self.total, unit="step", loss=loss, lr=lr)


def print_summary(console: Console | None, results: dict) -> None:
    if console is None:
        return
    table = Table(title="training done", show_header=False, box=None)
    rows = [
        ("steps", f"{results['steps']} (this run: {results['steps_this_run']})"),
        ("time", _time(results)),
        ("speed", f"{results['steps_per_second']:.2f} steps/s, {results['images_per_second']:.1f} images/s"),
        ("final loss", f"{results['final_loss']:.4f}" if results["final_loss"] is not None else "-"),
        ("peak memory", _memory(results)),
    ]
    if results.get("skipped_steps"):
        rows.append(("skipped steps", f"{results['skipped_steps']} (non-finite loss)"))
    rows += [(name, results["paths"][name]) for name in ("controlnet", "samples", "model_card", "logs")]
    for name, value in rows:
        table.add_row(f"[bold]{name}", escape(str(value)))
    console.print(table)


def _time(results: dict) -> str:
    """This run's time: a resumed run's steps before the resume are not in its wall clock."""
    this_run = results.get("seconds_this_run", results["seconds"])
    text = f"{this_run:.1f} s of steps, {results['wall_seconds']:.1f} s in all"
    if results.get("resumed_from"):
        text += f" (this run; {results['seconds']:.1f} s of steps since step 0)"
    return text


def _memory(results: dict) -> str:
    host = f"host {results['peak_memory_host_mb']:.0f} MiB"
    gpu = results.get("peak_memory_accelerator_mb")
    return host if gpu is None else f"{host}, accelerator {gpu:.0f} MiB"
