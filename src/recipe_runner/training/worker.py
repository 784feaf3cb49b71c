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
    except (UserError, RunFailed, Interrupted) as e:
        # Already reported to the launching process through train-result.json.
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
