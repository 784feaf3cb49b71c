"""The `recipe` command line (also `python -m recipe_runner`)."""

from recipe_runner.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
