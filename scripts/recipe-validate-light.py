#!/usr/bin/env python3
"""`recipe validate` from this checkout, for the `recipe-validate-light` pre-commit hook.

pre-commit runs it with the python3 on PATH, which needs only the recipe layer's four packages
(pip install pydantic pyyaml typer rich): recipe-runner itself is not installed, so neither is torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

LIGHT = ("pydantic", "yaml", "typer", "rich")


def main() -> int:
    missing = []
    for name in LIGHT:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.stderr.write(
            f"recipe-validate-light: {sys.executable} lacks {', '.join(missing)}; install the recipe "
            "layer's packages: pip install 'pydantic>=2.7,<3' 'pyyaml>=6' 'typer>=0.12' 'rich>=13' "
            "(or use the recipe-validate hook with recipe-runner installed)\n"
        )
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from recipe_runner.cli import app

    try:
        app(["validate", *sys.argv[1:]], prog_name="recipe")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
