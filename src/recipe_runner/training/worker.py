"""`python -m recipe_runner.training.worker RUN_DIR [--resume]`: what `accelerate launch` runs per process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recipe_runner.errors import Interrupted, RunFailed, UserError
from recipe_runner.training.launch import worker_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe_runner.training.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        worker_main(args.run_dir, args.resume)
    except Interrupted:
        # Every rank stops at the same step (they agree on it), and the launching process reads the outcome
        # from train-result.json and exits 130 itself: a 0 here keeps torch's agent from reporting a failure.
        return 0
    except (UserError, RunFailed) as e:
        # Already reported through train-result.json; non-zero, so that the agent stops the other ranks.
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
