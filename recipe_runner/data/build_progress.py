"""The dataset stage's progress: a rich bar fed by the map workers' row counts, and Ctrl-C that stays a
Ctrl-C through datasets' worker pool."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@contextlib.contextmanager
def interrupts_stay_interrupts() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a `num_proc` map: datasets' pool clean-up can raise its own error (a
    multiprocess TimeoutError) while handling the KeyboardInterrupt; the user asked to stop, so stop."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


@contextlib.contextmanager
def build_progress(console: Console | None, total: int, work: Path) -> Iterator[str | None]:
    """A rich progress bar fed by the workers' row counts (files in a folder: works across processes),
    and the same count as the run's throttled progress lines (log.txt, a pipe, --json)."""
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from recipe_runner.data.process import rows_done
    from recipe_runner.runfolder.events import reporter

    report = reporter(console)
    report.progress("dataset", 0, total)  # starts its clock: rate and ETA

    pdir = work / "progress"
    pdir.mkdir(parents=True, exist_ok=True)
    rate = TextColumn("{task.fields[rate]}")
    with Progress(
        TextColumn("dataset"), BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("rows", total=total, rate="")
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.25):
                speed, done = bar.tasks[task].speed, rows_done(str(pdir))
                bar.update(task, completed=done, rate=f"{speed:,.1f} rows/s" if speed else "")
                report.progress("dataset", done, total)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield str(pdir)
        finally:
            stop.set()
            thread.join()
            done = rows_done(str(pdir))
            bar.update(task, completed=done)
            report.progress("dataset", done, total)
