"""The dataset stage: from a recipe's `dataset:` section to image/conditioning_image/prompt rows.

    report = build_dataset(loaded, RunFolder(root), console=console)   # or the cached report
    cached, why = dataset_status(loaded, RunFolder(root))                # for `recipe plan`; reads no data

Importing this package is cheap (no datasets, no torch): `builtin_shapes` is imported by validation,
and the names below load their modules on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_dataset": "recipe_runner.data.build",
    "dataset_cache_key": "recipe_runner.data.cache_key",
    "dataset_status": "recipe_runner.data.cache_key",
    "DATASET_CODE_VERSION": "recipe_runner.data.cache_key",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
