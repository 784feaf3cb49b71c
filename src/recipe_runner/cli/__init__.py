"""The `recipe` command line (also `python -m recipe_runner`)."""

import os

from recipe_runner.cli.app import app


def main() -> None:
    # OpenMP threads waiting at a barrier sleep instead of spinning: beside another job on the same cores
    # (a dataset build, a second run, CI), spinning threads made a tiny run ×4.6 slower, sleeping ones
    # ×1.4 (benchmarks/contention.py); the demo's model trains as fast alone. Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


__all__ = ["app", "main"]
