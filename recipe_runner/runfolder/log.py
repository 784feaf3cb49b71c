"""What a run prints goes to the terminal and, without colours or progress bars, to RUN/log.txt."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console, ConsoleRenderable, NewLine, RenderHook

from recipe_runner.runfolder.events import NULL, NullReporter, Reporter

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee:
    """A file for rich: the terminal gets everything rich writes; the log gets what _LogHook hands it."""

    def __init__(self, terminal: TextIO | None, log: TextIO):
        self.terminal = terminal
        self.log = log
        self.lock = threading.Lock()  # prints and progress lines come from more than one thread
        self.reporter: NullReporter = NULL  # the run's progress lines and events (runfolder/events.py)

    def write(self, text: str) -> int:
        if self.terminal is not None:
            self.terminal.write(text)
        return len(text)

    def write_log(self, text: str) -> None:
        with self.lock:
            self.log.write(_ANSI.sub("", text).replace("\r", ""))
            self.log.flush()

    def flush(self) -> None:
        if self.terminal is not None:
            self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return bool(self.terminal is not None and self.terminal.isatty())

    def fileno(self) -> int:
        if self.terminal is None:
            raise OSError("no terminal")
        return self.terminal.fileno()


class _LogHook(RenderHook):
    """The first render hook, so it sees each print before a live display (rich's progress bars, status
    spinners) adds its frame and cursor moves: the log gets what was printed, as plain text, and never a
    frame; a message printed while a bar runs is kept, where filtering the written text lost it."""

    def __init__(self, console: Console, tee: _Tee):
        self.console, self.tee = console, tee

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        if not all(isinstance(r, NewLine) for r in renderables):  # a live display ends with console.line()
            options = self.console.options
            if self.console.soft_wrap:  # as print() renders by default here: long lines stay whole
                options = options.update(no_wrap=True, overflow="ignore")
            segments = (s for r in renderables for s in self.console.render(r, options) if not s.control)
            self.tee.write_log("".join(s.text for s in segments))
        return renderables


@contextlib.contextmanager
def run_console(log_path: Path, *, quiet: bool = False) -> Iterator[Console]:
    """A console that writes to stderr (unless quiet) and appends to the run's log.txt.

    Library warnings (diffusers, transformers, accelerate) go to the log file too. The console's
    reporter (`events.reporter(console)`) adds throttled progress lines, so neither a pipe nor the log
    goes minutes without a word while a live bar runs.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        tee = _Tee(None if quiet else sys.stderr, log)
        console = Console(file=tee, highlight=False, soft_wrap=True)  # type: ignore[arg-type]
        console.push_render_hook(_LogHook(console, tee))
        tee.reporter = Reporter(console, tee.write_log)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield console
        finally:
            root.removeHandler(handler)
            tee.flush()


def shows_on_terminal(console: Console | None) -> bool:
    """Whether `console` writes to a terminal (False for no console, or one of `run_console(quiet=True)`)."""
    if console is None:
        return False
    return not (isinstance(console.file, _Tee) and console.file.terminal is None)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and chatter; our progress and summaries say what matters.

    Their warnings still reach log.txt through the logging handler installed by `run_console`.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def peak_host_memory_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss only grows: a stage's figure is the run's
    peak up to that stage's end)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
