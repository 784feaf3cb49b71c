"""The `recipe` command line (also `python -m recipe_runner`).

app.py makes the app and its recipe commands; review.py (plan, diff) and stages.py (the commands that do
work) add theirs when imported here, in the order `recipe --help` lists them.
"""

from recipe_runner.cli import publish, review, stages  # noqa: F401  (they register their commands on `app`)
from recipe_runner.cli.app import app


def main() -> None:
    from recipe_runner.cli.process import run_and_exit

    run_and_exit(app)


__all__ = ["app", "main"]
