"""Conditions computed with OpenCV and NumPy alone: no weights, no torch, no controlnet_aux.

OpenCV is imported where it is used: a run whose dataset brings its own conditioning images never
loads it (40 MiB of a training process's memory).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from recipe_runner.conditions.base import BaseCondition, image_seed
from recipe_runner.recipe.condition import (
    CannyCondition,
    ColorPaletteCondition,
    ScribbleCondition,
    ShuffleCondition,
)


def _edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    # On the colour image, as ControlNet's own canny annotator does: edges between colours of equal
    # brightness count too.
    import cv2

    return cv2.Canny(rgb, low, high)


class Canny(BaseCondition):
    """White Canny edges on black."""

    type = "canny"
    cfg: CannyCondition

    def _apply(self, image: Image.Image) -> np.ndarray:
        import cv2

        edges = _edges(np.asarray(image), self.cfg.low_threshold, self.cfg.high_threshold)
        return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


class Scribble(BaseCondition):
    """Canny edges dilated to `thickness` pixels: rough strokes like a hand-drawn scribble."""

    type = "scribble"
    cfg: ScribbleCondition

    def _apply(self, image: Image.Image) -> np.ndarray:
        import cv2

        edges = _edges(np.asarray(image), self.cfg.low_threshold, self.cfg.high_threshold)
        t = self.cfg.thickness
        if t > 1:
            edges = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (t, t)))
        return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


def _noise_disk(rng: np.random.Generator, h: int, w: int, f: int) -> np.ndarray:
    # controlnet_aux.util.make_noise_disk, drawing from `rng` instead of the global RNG.
    import cv2

    noise = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f : f + h, f : f + w]
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-12)


class Shuffle(BaseCondition):
    """Content shuffle: the image remapped through a smooth random flow field (ControlNet 1.1 shuffle).

    controlnet_aux's ContentShuffleDetector draws the field from NumPy's global RNG, so every run gives a
    different dataset. Here the field is seeded from a hash of the image, so the same image always gives
    the same result. `grid` is the flow field's cell size in pixels (controlnet_aux's `f`).
    """

    type = "shuffle"
    cfg: ShuffleCondition

    def _apply(self, image: Image.Image) -> np.ndarray:
        import cv2

        rgb = np.asarray(image)
        h, w = rgb.shape[:2]
        rng = np.random.default_rng(image_seed(rgb))
        x = _noise_disk(rng, h, w, self.cfg.grid) * float(w - 1)
        y = _noise_disk(rng, h, w, self.cfg.grid) * float(h - 1)
        flow = np.stack([x, y], axis=2).astype(np.float32)
        return cv2.remap(rgb, flow, None, cv2.INTER_LINEAR)


class ColorPalette(BaseCondition):
    """Mosaic of mean colours: area-averaged down to grid_size x grid_size, back up with nearest neighbour."""

    type = "color_palette"
    cfg: ColorPaletteCondition

    def _apply(self, image: Image.Image) -> Image.Image:
        g = self.cfg.grid_size
        small = image.resize((g, g), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
