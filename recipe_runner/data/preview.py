"""preview.png: the first rows of a built dataset as image | conditioning image | prompt, one row each.

It is the first thing to open after a build: a wrong column mapping, a misaligned crop or an empty
condition shows at a glance. Drawn with PIL alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from recipe_runner.runfolder.fonts import font_for, wrap

MAX_ROWS = 8
TILE = 192  # pixels per image in the grid, whatever the dataset resolution
_PAD = 8
_TEXT_WIDTH = 2 * TILE
_BACKGROUND, _INK = (255, 255, 255), (20, 20, 20)
_FONT_SIZE = 14


def render_preview(rows: list[dict[str, Any]]) -> Image.Image:
    """A grid of (image, conditioning_image, prompt) rows: PIL images and strings."""
    width = 3 * _PAD + 2 * TILE + _PAD + _TEXT_WIDTH
    height = _PAD + max(len(rows), 1) * (TILE + _PAD)
    grid = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = _PAD + i * (TILE + _PAD)
        for j, key in enumerate(("image", "conditioning_image")):
            # Letterboxed, so a bucketed (non-square) image shows its real aspect ratio and crop.
            tile = ImageOps.pad(
                row[key].convert("RGB"), (TILE, TILE), Image.Resampling.LANCZOS, color=_BACKGROUND
            )
            grid.paste(tile, (_PAD + j * (TILE + _PAD), y))
        prompt = row["prompt"] or "(empty prompt)"
        font = font_for(prompt, _FONT_SIZE)
        lines = wrap(prompt, font, _TEXT_WIDTH, max_lines=TILE // 18)
        draw.multiline_text(
            (3 * _PAD + 2 * TILE + _PAD, y), "\n".join(lines), fill=_INK, font=font, spacing=4
        )
    return grid


def write_preview(dataset: Any, path: Path, max_rows: int = MAX_ROWS) -> None:
    """Draw the first `max_rows` rows of a `datasets.Dataset` with image/conditioning_image/prompt."""
    n = min(max_rows, len(dataset))
    rows = [dataset[i] for i in range(n)]
    render_preview(rows).save(path, format="PNG")
