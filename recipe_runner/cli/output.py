"""How the CLI talks: errors as located one-liners, exit codes, JSON for tools.

Only the CLI turns typed errors into output and exit codes (2 invalid input, 1 failed
run, 130 interrupted); library code just raises.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from recipe_runner.errors import Interrupted, Problem, RunFailed, UserError

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def format_problem(p: Problem, level: str = "error") -> str:
    """One located problem as rich markup: `file:line:col: error: field: message`, and its hint.
    `level` "warning" marks one that does not fail (a hub id that moved, ...)."""
    where = p.location()
    head = f"{where}: " if where else ""
    field = f"{p.path}: " if p.path else ""
    label = "error:" if level == "error" else f"[yellow]{level}:[/]"
    text = f"[bold]{escape(head)}[/]{label} [cyan]{escape(field)}[/]{escape(p.message)}"
    if p.hint:
        text += f"\n    [green]{escape(p.hint)}[/]"
    return text


def print_problems(problems: list[Problem]) -> None:
    for p in problems:
        err.print(format_problem(p))


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


# OS errors that mean the machine ran out of something (exit 1: the run failed); any other OS error is
# about a path the user gave or owns (a read-only folder, a file where a folder should be: exit 2).
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def _os_error(e: OSError) -> tuple[str, str, int]:
    """(message, hint, exit code) for an OS error no stage turned into a message of its own."""
    where = " → ".join(escape(str(f)) for f in (e.filename, e.filename2) if f is not None) or "a file"
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (
            "free space on that disk or choose a run folder on another one (--output-dir); completed "
            "checkpoints are kept, and --resume continues from the newest"
        )
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the permissions of that path, or choose a run folder you can write (--output-dir)"
    elif e.errno in _RESOURCE_ERRNOS:
        hint = "the machine ran short; try again, or with fewer dataset.num_proc workers"
    else:
        hint = "check that path: it should exist and be a file or a folder as the recipe expects"
    return f"{where}: {escape(what)}", hint, 1 if e.errno in _RESOURCE_ERRNOS else 2


@contextlib.contextmanager
def _signals_stop_the_command() -> Iterator[None]:
    """SIGTERM stops a command as Ctrl-C does (temporaries removed, a message, exit 130) instead of
    killing it where it stands; training installs its own handlers, which checkpoint first.

    Processes forked from this one (datasets' `num_proc` pool) keep the defaults' effect: SIGTERM kills
    them, so their pool can stop them, and Ctrl-C, which reaches the whole process group, is left to
    this process (each worker would print its own traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt("stopped by SIGTERM")

    def on_sigint(signum: int, frame: Any) -> None:
        if os.getpid() == main:
            raise KeyboardInterrupt

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in ((signal.SIGTERM, on_sigterm), (signal.SIGINT, on_sigint))
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def handles_errors(fn: F) -> F:
    """Turn the typed errors into messages and exit codes; user mistakes never traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _signals_stop_the_command():
                return fn(*args, **kwargs)
        except OSError as e:
            message, hint, code = _os_error(e)
            err.print(f"[red]error:[/] {message}")
            err.print(f"    [green]{escape(hint)}[/]")
            raise SystemExit(code) from None
        except UserError as e:
            if e.problems:
                print_problems(e.problems)
            if not e.problems or len(e.problems) > 1:
                err.print(f"[red]error:[/] {escape(e.message)}")
            if e.hint:
                err.print(f"    [green]{escape(e.hint)}[/]")
            raise SystemExit(e.exit_code) from None
        except RunFailed as e:
            err.print(f"[red]run failed:[/] {escape(e.message)}")
            if e.log:
                err.print(f"    the log is at {escape(e.log)}")
            raise SystemExit(1) from None
        except (Interrupted, KeyboardInterrupt) as e:
            from recipe_runner.training.distributed import launched_rank

            # Under `accelerate launch` every rank stops with the same message: rank 0 says it.
            if launched_rank() in (None, 0):
                err.print(f"[yellow]{escape(str(e) or 'interrupted')}[/]")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
