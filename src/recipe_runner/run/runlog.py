"""What a run prints goes to the terminal and, without colours or progress redraws, to RUN/log.txt."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_REDRAW = re.compile(r"\x1b\[(\d*A|2K|\?25[lh])")


class _Tee:
    """A file for rich: the terminal gets everything; the log gets plain text and no live progress frames."""

    def __init__(self, terminal: TextIO | None, log: TextIO):
        self.terminal = terminal
        self.log = log

    def write(self, text: str) -> int:
        if self.terminal is not None:
            self.terminal.write(text)
        if not _REDRAW.search(text):
            self.log.write(_ANSI.sub("", text).replace("\r", ""))
        return len(text)

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


@contextlib.contextmanager
def run_console(log_path: Path, *, quiet: bool = False) -> Iterator[Console]:
    """A console that writes to stderr (unless quiet) and appends to the run's log.txt.

    Library warnings (diffusers, transformers, accelerate) go to the log file too.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        tee = _Tee(None if quiet else sys.stderr, log)
        console = Console(file=tee, highlight=False, soft_wrap=True)  # type: ignore[arg-type]
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
