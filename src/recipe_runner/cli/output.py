"""How the CLI talks: errors as located one-liners, exit codes, JSON for tools.

Only the CLI turns typed errors into output and exit codes (2 invalid input, 1 failed
run, 130 interrupted); library code just raises.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from recipe_runner.errors import Interrupted, Problem, RunFailed, UserError

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def format_problem(p: Problem) -> str:
    where = p.location()
    head = f"{where}: " if where else ""
    field = f"{p.path}: " if p.path else ""
    text = f"[bold]{escape(head)}[/]error: [cyan]{escape(field)}[/]{escape(p.message)}"
    if p.hint:
        text += f"\n    [green]{escape(p.hint)}[/]"
    return text


def print_problems(problems: list[Problem]) -> None:
    for p in problems:
        err.print(format_problem(p))


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def handles_errors(fn: F) -> F:
    """Turn the typed errors into messages and exit codes; user mistakes never traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
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
            from recipe_runner.run.distributed import launched_rank

            # Under `accelerate launch` every rank stops with the same message: rank 0 says it.
            if launched_rank() in (None, 0):
                err.print(f"[yellow]{escape(str(e) or 'interrupted')}[/]")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
