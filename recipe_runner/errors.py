"""The typed errors users can cause.

Library code raises these; only the CLI turns them into messages and exit codes
(2 for bad recipes or inputs, 1 for failed runs). Internal bugs may traceback;
user mistakes never do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    """One thing wrong with a recipe or an input, and where it is."""

    message: str
    path: str = ""  # dotted field path, e.g. "train.learning_rate"
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None  # what would be right, e.g. a did-you-mean

    def location(self) -> str:
        if self.file is None:
            return ""
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.column or 1}"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


class UserError(Exception):
    """A mistake in a recipe or input the user can fix: exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, problems: list[Problem] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems: list[Problem] = problems or []


class RecipeError(UserError):
    """Every problem found in one recipe at once (parse, merge or validation)."""

    def __init__(self, problems: list[Problem]):
        n = len(problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in recipe", problems=problems)


class RunFailed(Exception):
    """A stage failed for reasons other than bad input: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, *, log: str | None = None):
        super().__init__(message)
        self.message = message
        self.log = log


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM after writing what it could: exit code 130."""

    exit_code = 130
