"""The offline "fill50k-like" dataset: one filled coloured shape on a coloured background.

Each row depends only on (seed, index), so rows can be generated in parallel processes and any
single row regenerated later. Plain PIL + numpy on purpose: validation and data preparation import
this module and must stay light.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Names appear verbatim in prompts (and in the tiny tokenizer's vocabulary); the colours are spread
# over hue and lightness so that any two of them are easy to tell apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "lime green": (140, 210, 50),
    "dark green": (20, 100, 40),
    "teal": (0, 140, 140),
    "sky blue": (110, 180, 240),
    "navy blue": (20, 30, 110),
    "purple": (120, 50, 160),
    "pink": (245, 140, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

PROMPT_TEMPLATE = "{a} {color} {shape} on {a_bg} {background} background"
# Every word a prompt can contain, for tokenizers that want whole-word tokens.
PROMPT_WORDS: tuple[str, ...] = tuple(
    sorted({w for text in (*SHAPES, *COLORS, PROMPT_TEMPLATE, "a an") for w in text.split() if w.isalpha()})
)

_SUPERSAMPLE = 4  # draw at 4x and downsample: cheap anti-aliasing


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _vertices(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices inscribed in the circle (cx, cy, r), rotated by `angle` radians."""
    if shape == "square":
        radii, n = [r], 4
    elif shape == "triangle":
        radii, n = [r], 3
    elif shape == "star":
        radii, n = [r, 0.45 * r], 10  # alternate outer and inner points
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    return [
        (
            cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
            cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, **style
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **style)
    else:
        draw.polygon(_vertices(shape, cx, cy, r, angle), **style)


def make_sample(index: int, *, seed: int, resolution: int) -> dict:
    """Row `index` of the dataset for `seed`: image, outline conditioning image, prompt and mask."""
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16, got {resolution}")
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color_i = int(rng.integers(len(COLORS)))
    # Pick the background from the other colours so that the shape is always visible.
    bg_i = (color_i + 1 + int(rng.integers(len(COLORS) - 1))) % len(COLORS)
    color, background = COLORS[color_i], COLORS[bg_i]

    # ~2px outline at 64px, scaled with resolution; the shape stays fully inside the frame.
    outline_px = max(1, round(2 * resolution / 64))
    r = rng.uniform(0.15, 0.30) * resolution  # circumradius: diameter is 30-60% of the image
    margin = r + outline_px
    cx = rng.uniform(margin, resolution - margin)
    cy = rng.uniform(margin, resolution - margin)
    angle = rng.uniform(0, 2 * math.pi)

    s = _SUPERSAMPLE
    big = (resolution * s, resolution * s)
    geometry = (shape, cx * s, cy * s, r * s, angle)

    mask_big = Image.new("L", big, 0)
    _draw(ImageDraw.Draw(mask_big), *geometry, fill=255)
    image_big = Image.composite(
        Image.new("RGB", big, PALETTE[color]), Image.new("RGB", big, PALETTE[background]), mask_big
    )
    outline_big = Image.new("L", big, 0)
    _draw(ImageDraw.Draw(outline_big), *geometry, outline=255, width=outline_px * s)

    size = (resolution, resolution)
    mask = mask_big.resize(size, Image.Resampling.BOX).point(lambda v: 255 if v >= 128 else 0)
    return {
        "image": image_big.resize(size, Image.Resampling.LANCZOS),
        "conditioning_image": outline_big.resize(size, Image.Resampling.LANCZOS).convert("RGB"),
        "prompt": PROMPT_TEMPLATE.format(
            a=_article(color), color=color, shape=shape, a_bg=_article(background), background=background
        ),
        "mask": mask,
        "shape": shape,
        "color": color,
        "background": background,
    }


def generate(num_samples: int, *, seed: int = 0, resolution: int = 64) -> Iterator[dict]:
    """Rows 0..num_samples-1 of the dataset for `seed`, in order."""
    for index in range(num_samples):
        yield make_sample(index, seed=seed, resolution=resolution)
