"""Shape-mask IoU for the builtin `shapes` data: does the generated image draw the right shape, in place?

Every shapes prompt names the shape's colour ("a navy blue star on an orange background"), and the
palette's colours are far apart, so a shape's mask is simply the pixels close to that colour.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from recipe_runner.data.builtin_shapes import PALETTE, SHAPES
from recipe_runner.evaluate.metrics import as_rgb

# Under half the distance between the two closest palette colours (orange and yellow, ~76 apart in RGB),
# so no pixel can be close to two palette colours at once.
COLOR_TOLERANCE = 36.0

_COLOR = "|".join(re.escape(c) for c in sorted(PALETTE, key=len, reverse=True))
_PROMPT_RE = re.compile(
    rf"^an? (?P<color>{_COLOR}) (?P<shape>{'|'.join(SHAPES)}) on an? (?P<background>{_COLOR}) background$"
)


def parse_shape_prompt(prompt: str) -> dict[str, str] | None:
    """{'color', 'shape', 'background'} of a builtin shapes prompt; None for any other prompt."""
    match = _PROMPT_RE.match(prompt.strip().lower())
    return match.groupdict() if match else None


def color_mask(image: Any, color: tuple[int, int, int], tolerance: float = COLOR_TOLERANCE) -> np.ndarray:
    """Pixels within `tolerance` (Euclidean distance in RGB, 0-255) of `color`."""
    rgb = as_rgb(image).astype(np.float32)
    return np.linalg.norm(rgb - np.asarray(color, np.float32), axis=2) <= tolerance


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def shape_iou(
    ref_image: Any, new_image: Any, prompt: str, *, tolerance: float = COLOR_TOLERANCE
) -> dict[str, float]:
    """IoU of the prompt colour's mask in the held-out image and in the generated one; {} if the prompt
    is not a shapes prompt (the row is then left out of the mean)."""
    parsed = parse_shape_prompt(prompt)
    if parsed is None:
        return {}
    ref = as_rgb(ref_image)
    new = as_rgb(new_image, (ref.shape[1], ref.shape[0]))
    color = PALETTE[parsed["color"]]
    return {"shape_iou": mask_iou(color_mask(ref, color, tolerance), color_mask(new, color, tolerance))}
