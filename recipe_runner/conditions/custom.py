"""The `custom` condition: the user's own `package.module:function`.

The module is imported in `setup` (so on the first image), never when the recipe is validated: checking a
recipe must not run user code. The recipe's folder goes first on sys.path, as a script's folder does, so
a `conds.py` beside the recipe can be named as `conds:function`. The dataset cache key holds a digest of
the module's source, found over this same search path without importing it (`data/condition_code.py`).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recipe_runner.conditions.base import BaseCondition
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import CustomCondition


def load_function(spec: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import `module:function`, with the recipe's folder on sys.path; every failure is a UserError."""
    module_name, _, attr = spec.partition(":")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            searched = "\n  ".join(os.path.abspath(p or os.curdir) for p in sys.path)
            raise UserError(
                f"condition.function: no module named {e.name!r} (from {spec!r})",
                hint=f"put {module_name.replace('.', '/')}.py beside the recipe; searched:\n  {searched}",
            ) from None
        raise UserError(
            f"condition.function: module {module_name!r} imports {e.name!r}, which is not installed"
        ) from None
    except Exception as e:
        raise UserError(f"condition.function: importing {module_name!r} failed: {_describe(e)}") from e
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        close = difflib.get_close_matches(attr, names, n=1)
        where = getattr(module, "__file__", None) or module_name
        hint = (
            f"did you mean {module_name}:{close[0]}?"
            if close
            else f"it defines: {', '.join(names) or 'nothing'}"
        )
        raise UserError(f"condition.function: module {module_name!r} ({where}) has no {attr!r}", hint=hint)
    function = getattr(module, attr)
    if not callable(function):
        raise UserError(f"condition.function: {spec} is a {type(function).__name__}, not a function")
    return function


class Custom(BaseCondition):
    """Calls `function(image, **params)` with an RGB copy of the image; accepts a PIL image or uint8 array."""

    type = "custom"
    cfg: CustomCondition

    def _load(self, device: str | None) -> Any:
        return load_function(self.cfg.function, self.base_dir)

    def _apply(self, image: Image.Image) -> Image.Image:
        try:
            result = self._model(image.copy(), **self.cfg.params)
        except Exception as e:
            raise UserError(
                f"condition.function: {self.cfg.function} raised {_describe(e)} "
                f"on a {image.width}x{image.height} image"
            ) from e
        return _to_image(result, self.cfg.function)


def _to_image(result: Any, spec: str) -> Image.Image:
    if isinstance(result, Image.Image):
        return result
    if isinstance(result, np.ndarray):
        shape_ok = result.ndim == 2 or (result.ndim == 3 and result.shape[2] in (1, 3))
        if result.dtype == np.uint8 and shape_ok:
            return Image.fromarray(result[:, :, 0] if result.ndim == 3 and result.shape[2] == 1 else result)
        raise UserError(
            f"condition.function: {spec} returned an array of shape {result.shape} and dtype {result.dtype}",
            hint="return a PIL image, or a uint8 array of shape HxW or HxWx3",
        )
    shown = repr(result)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise UserError(
        f"condition.function: {spec} returned {type(result).__name__} {shown}, not an image",
        hint="return a PIL image, or a uint8 array of shape HxW or HxWx3",
    )


def _describe(error: BaseException) -> str:
    """'ValueError: bad thing (conds.py:12)': type, message and the innermost line of the user's code."""
    frames = traceback.extract_tb(error.__traceback__)
    # Skip this file, importlib's frozen frames, installed packages and the standard library.
    skip = (sys.prefix, sys.base_prefix, "<frozen", __file__)
    own = [f for f in frames if not f.filename.startswith(skip)]
    where = f" ({Path(own[-1].filename).name}:{own[-1].lineno})" if own else ""
    return f"{type(error).__name__}: {error}{where}"
