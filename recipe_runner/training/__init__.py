"""The training stage: ControlNet training with accelerate (see stage.py for the flow).

`training_cache_key` needs no torch (`recipe plan` uses it); the rest is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recipe_runner.training.keys import training_cache_key

if TYPE_CHECKING:
    from recipe_runner.training.launch import launch_workers
    from recipe_runner.training.stage import PreparedTraining, prepare_training, train_controlnet
    from recipe_runner.training.worker import worker_main

__all__ = [
    "PreparedTraining",
    "launch_workers",
    "prepare_training",
    "train_controlnet",
    "training_cache_key",
    "worker_main",
]

_LAZY = {
    "PreparedTraining": "recipe_runner.training.stage",
    "prepare_training": "recipe_runner.training.stage",
    "train_controlnet": "recipe_runner.training.stage",
    "launch_workers": "recipe_runner.training.launch",
    "worker_main": "recipe_runner.training.worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recipe_runner.training' has no attribute {name!r}")
