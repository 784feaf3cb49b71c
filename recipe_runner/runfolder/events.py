"""Progress that a pipe, a log file or a tool can read, beside rich's live bars.

rich redraws its bars in place on a terminal; into a pipe or a file it prints nothing until a bar is
done, and log.txt never gets its frames. So the long loops (dataset build, precompute, training) also
tell the run's reporter how far they are, and it writes one plain line at most every
RECIPE_RUNNER_PROGRESS_SECONDS (30 s): to log.txt always, and to the console too when that is no
terminal. Under `--json`, stdout carries JSON lines instead: stage_start, stage_end and progress
events, then the command's result. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console

ENV = "RECIPE_RUNNER_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
# Set inside json_lines(): the training processes `accelerate launch` starts (launch.num_processes > 1)
# inherit it and the CLI's stdout, so their rank 0 streams its progress events too.
JSON_ENV = "RECIPE_RUNNER_JSON_EVENTS"

_json_out: TextIO | None = None  # where reporters write JSON events, inside json_lines()
_json_lock = threading.Lock()  # the dataset's poller reports from a thread of its own


def progress_seconds() -> float:
    """The throttle, from the environment (tests set it to 0: every update is a line)."""
    try:
        return max(0.0, float(os.environ.get(ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


class NullReporter:
    """What code reports to when no run console is there (other ranks, library callers): nothing."""

    def stage_start(self, stage: str, reason: str) -> None:
        pass

    def stage_end(self, stage: str, *, seconds: float, skipped: bool) -> None:
        pass

    def progress(self, stage: str, done: int, total: int, *, unit: str = "rows", **figures: Any) -> None:
        pass


NULL = NullReporter()


def reporter(console: Console | None) -> NullReporter:
    """The reporter of a run console (runfolder/log.py hangs it on the console's file); no-op otherwise."""
    return getattr(getattr(console, "file", None), "reporter", NULL)


@dataclass
class _Task:
    started: float  # clock and count at the first report: rate and ETA are over this run's work
    start: int
    shown: float  # when the last line was written
    done: int = 0
    finished: bool = False


class Reporter(NullReporter):
    """Throttled plain lines for `console` and `log` (a writer to log.txt); JSON events in json_lines()."""

    def __init__(
        self,
        console: Console,
        log: Callable[[str], None],
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console, self.log, self.clock = console, log, clock
        self.every = progress_seconds() if every is None else every
        self.json_out = _json_out or (sys.stdout if os.environ.get(JSON_ENV) == "1" else None)
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.Lock()

    def stage_start(self, stage: str, reason: str) -> None:
        self._event({"event": "stage_start", "stage": stage, "reason": reason})

    def stage_end(self, stage: str, *, seconds: float, skipped: bool) -> None:
        self._event({"event": "stage_end", "stage": stage, "seconds": seconds, "skipped": skipped})

    def progress(self, stage: str, done: int, total: int, *, unit: str = "rows", **figures: Any) -> None:
        """`done` of `total` (unit "step" or a noun: "rows"); the first report of a stage starts its clock."""
        now = self.clock()
        with self._lock:
            task = self._tasks.get(stage)
            if task is None or done < task.done:
                self._tasks[stage] = _Task(now, done, now, done)
                return
            task.done = done
            final = done >= total
            if task.finished or (not final and now - task.shown < self.every):
                return
            task.shown, task.finished = now, final
            elapsed, count = now - task.started, done - task.start
        rate = count / elapsed if elapsed > 0 and count > 0 else None
        eta = 0.0 if final else (total - done) / rate if rate else None
        self._say(_line(stage, done, total, unit, rate, eta, figures))
        key = "step" if unit == "step" else unit
        self._event(
            {
                "event": "progress",
                "stage": stage,
                key: done,
                "total": total,
                **figures,
                f"{'steps' if unit == 'step' else unit}_per_second": None if rate is None else round(rate, 4),
                "eta_seconds": None if eta is None else round(eta, 1),
            }
        )

    def _say(self, line: str) -> None:
        if self.console.is_terminal:  # the live bar shows it; only the log needs the line
            self.log(line + "\n")
        else:  # a pipe, CI, a file (or quiet: the console then writes to the log alone)
            self.console.print(line, markup=False, highlight=False, emoji=False)

    def _event(self, event: dict[str, Any]) -> None:
        if self.json_out is not None:
            write_json_line(self.json_out, event)


def _line(
    stage: str, done: int, total: int, unit: str, rate: float | None, eta: float | None, figures: dict
) -> str:
    head = f"{stage}: step {done}/{total}" if unit == "step" else f"{stage}: {done}/{total} {unit}"
    parts = [head, *(f"{name} {_figure(name, v)}" for name, v in figures.items())]
    parts.append(f"{rate:.2f} {'it' if unit == 'step' else unit}/s" if rate else "-/s")
    parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA -")
    return ", ".join(parts)


def _figure(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if name == "lr" else f"{value:.4f}"
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _plain(value: Any) -> Any:
    """JSON-safe: a NaN or infinite loss becomes null (strict parsers reject NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json_line(out: TextIO, event: dict[str, Any]) -> None:
    with _json_lock:
        out.write(json.dumps(_plain(event), default=str) + "\n")
        out.flush()


@contextlib.contextmanager
def json_lines(enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Under `--json`, reporters made inside write their events to stdout; yields the writer for the
    command's last line (its result). Disabled: nothing changes, and the writer does nothing."""
    global _json_out
    if not enabled:
        yield lambda event: None
        return
    out, previous, inherited = sys.stdout, _json_out, os.environ.get(JSON_ENV)
    _json_out, os.environ[JSON_ENV] = out, "1"
    try:
        yield lambda event: write_json_line(out, event)
    finally:
        _json_out = previous
        if inherited is None:
            os.environ.pop(JSON_ENV, None)
        else:
            os.environ[JSON_ENV] = inherited
