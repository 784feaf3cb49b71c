"""Applying a recipe's `condition:` section: one small callable object per condition type.

    fn = build_condition(recipe.condition, base_dir=recipe_folder)
    fn.setup()                      # optional; the first call does it (once per worker process)
    conditioning = fn(image)        # RGB, same size as `image`; deterministic

Building is cheap and runs no user code and loads no weights, so objects can be built while planning and
pickled to `datasets.map(num_proc=N)` workers. Importing this package imports neither torch nor
controlnet_aux; the conditions that need them import them in `setup`.
"""

from __future__ import annotations

from pathlib import Path

from recipe_runner.conditions.annotators import Depth, Hed, Lineart, Mlsd, Normal, Openpose, Segmentation
from recipe_runner.conditions.base import BaseCondition, ConditionFn, to_rgb
from recipe_runner.conditions.custom import Custom
from recipe_runner.conditions.face import MediapipeFace
from recipe_runner.conditions.simple import Canny, ColorPalette, Scribble, Shuffle
from recipe_runner.recipe.condition import Condition

CONDITIONS: dict[str, type[BaseCondition]] = {
    cls.type: cls
    for cls in (
        Canny,
        Scribble,
        Shuffle,
        ColorPalette,
        Hed,
        Depth,
        Openpose,
        Mlsd,
        Lineart,
        Normal,
        Segmentation,
        MediapipeFace,
        Custom,
    )
}
"""Condition classes by the recipe's `condition.type`."""


def build_condition(cfg: Condition, *, base_dir: Path | None = None) -> ConditionFn:
    """The callable for a validated condition section; `base_dir` is the recipe's folder.

    Relative annotator folders and custom modules are looked up there.
    """
    return CONDITIONS[cfg.type](cfg, base_dir=base_dir)


__all__ = ["CONDITIONS", "BaseCondition", "ConditionFn", "build_condition", "to_rgb"]
