"""Condition fidelity: how well a trained ControlNet follows its condition, against the base model.

    result = evaluate_folder(loaded, RunFolder(run_dir), console=console)   # the `evaluate` stage

Held-out conditions are turned into images by the base model with and without the ControlNet; the
recipe's condition is re-extracted from each image and compared with the input (`metrics`).
"""

from __future__ import annotations

from recipe_runner.evaluate.metrics import HIGHER_IS_BETTER, metrics_for
from recipe_runner.evaluate.stage import evaluate_folder, evaluate_pipeline

__all__ = ["HIGHER_IS_BETTER", "evaluate_folder", "evaluate_pipeline", "metrics_for"]
