"""Importing controlnet_aux detectors one by one, without the package's __init__."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from recipe_runner.errors import UserError

INSTALL_HINT = "pip install 'recipe-runner[annotators]'"


def require_controlnet_aux() -> None:
    """Fail with an install hint, without importing anything, when controlnet_aux is missing."""
    if "controlnet_aux" not in sys.modules and importlib.util.find_spec("controlnet_aux") is None:
        raise UserError("this condition needs controlnet_aux, which is not installed", hint=INSTALL_HINT)


def _import_detector(submodule: str, name: str) -> Any:
    """`name` from `controlnet_aux.<submodule>`, without running controlnet_aux/__init__.py.

    That __init__ imports every detector, mediapipe_face included, and mediapipe_face_common touches
    `mediapipe.solutions` at import time, which mediapipe >= 0.10.22 no longer has: with such a
    mediapipe installed, even HED would fail to import. A bare package module whose __path__ is the real
    package folder lets Python find the submodules while skipping __init__. Only done when
    controlnet_aux is not imported yet, so a fully imported package is left alone.
    """
    require_controlnet_aux()
    if "controlnet_aux" not in sys.modules:
        spec = importlib.util.find_spec("controlnet_aux")
        package = types.ModuleType("controlnet_aux")
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec  # importlib.util.find_spec("controlnet_aux") still works afterwards
        package.__package__ = "controlnet_aux"
        sys.modules["controlnet_aux"] = package
    try:
        module = importlib.import_module(f"controlnet_aux.{submodule}")
    except ModuleNotFoundError as e:
        raise UserError(
            f"controlnet_aux.{submodule} needs the module {e.name!r}, which is not installed",
            hint=INSTALL_HINT,
        ) from e
    return getattr(module, name)
