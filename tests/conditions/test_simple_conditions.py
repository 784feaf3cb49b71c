"""Weight-free conditions: canny, scribble, shuffle, color_palette."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image, ImageDraw

from recipe_runner.conditions import build_condition, to_rgb
from recipe_runner.recipe.condition import (
    CannyCondition,
    ColorPaletteCondition,
    ScribbleCondition,
    ShuffleCondition,
)

WEIGHT_FREE = [CannyCondition(), ScribbleCondition(), ShuffleCondition(), ColorPaletteCondition()]


def _distance_to_square_border(size: int = 64, lo: int = 16, hi: int = 47) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    inside = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
    to_edge = np.minimum.reduce([np.abs(x - lo), np.abs(x - hi), np.abs(y - lo), np.abs(y - hi)])
    outside = np.maximum.reduce([lo - x, x - hi, lo - y, y - hi])
    return np.where(inside, to_edge, outside)


def _edge_mask(image: Image.Image) -> np.ndarray:
    a = np.asarray(image)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), "edges must be grey"
    assert set(np.unique(a)) <= {0, 255}, "edges must be pure white on black"
    return a[..., 0] == 255


def test_canny_finds_the_square_border_and_nothing_else(square: Image.Image) -> None:
    edges = _edge_mask(build_condition(CannyCondition())(square))
    dist = _distance_to_square_border()
    assert edges.any()
    assert (dist[edges] <= 1).all(), "edge pixels must lie on the square's border"
    assert not edges[dist >= 3].any(), "flat areas must have no edges"
    for side in (edges[16:48, 15:18], edges[16:48, 46:49], edges[15:18, 16:48], edges[46:49, 16:48]):
        assert side.any(axis=1).sum() + side.any(axis=0).sum() >= 30  # every side is traced


def test_canny_thresholds_matter() -> None:
    faint = Image.new("L", (64, 64), 90)
    ImageDraw.Draw(faint).rectangle([16, 16, 47, 47], fill=100)
    assert not _edge_mask(build_condition(CannyCondition(low_threshold=100, high_threshold=200))(faint)).any()
    assert _edge_mask(build_condition(CannyCondition(low_threshold=10, high_threshold=20))(faint)).any()


def test_scribble_is_a_thicker_canny(square: Image.Image) -> None:
    canny = _edge_mask(build_condition(CannyCondition())(square))
    thin = _edge_mask(build_condition(ScribbleCondition(thickness=1))(square))
    thick = _edge_mask(build_condition(ScribbleCondition(thickness=5))(square))
    assert (thin == canny).all()
    assert thick.sum() > 2 * canny.sum()
    assert thick[canny].all(), "dilation keeps every canny edge"
    assert not thick[_distance_to_square_border() >= 5].any()


def test_color_palette_cells_hold_the_mean_colour_of_their_area() -> None:
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(64), np.arange(64))
    rgb = np.stack([x * 4, y * 4, rng.integers(0, 256, (64, 64))], axis=2).astype(np.uint8)
    out = np.asarray(build_condition(ColorPaletteCondition(grid_size=8))(Image.fromarray(rgb))).astype(int)
    cells = set()
    for i in range(8):
        for j in range(8):
            cell = out[8 * i : 8 * i + 8, 8 * j : 8 * j + 8].reshape(-1, 3)
            assert (cell == cell[0]).all(), "each cell is one colour"
            mean = rgb[8 * i : 8 * i + 8, 8 * j : 8 * j + 8].reshape(-1, 3).mean(axis=0)
            assert np.abs(cell[0] - mean).max() <= 1
            cells.add(tuple(cell[0]))
    assert len(cells) == 64
    assert len(np.unique(out.reshape(-1, 3), axis=0)) == 64


def test_color_palette_on_a_size_not_divisible_by_the_grid(gradient: Image.Image) -> None:
    image = gradient.resize((50, 30))
    out = build_condition(ColorPaletteCondition(grid_size=4))(image)
    assert out.size == (50, 30)
    assert len(np.unique(np.asarray(out).reshape(-1, 3), axis=0)) == 16


def test_shuffle_is_deterministic_and_changes_the_image(gradient: Image.Image) -> None:
    shuffle = build_condition(ShuffleCondition())
    first = np.asarray(shuffle(gradient))
    assert (np.asarray(shuffle(gradient)) == first).all()
    assert (np.asarray(build_condition(ShuffleCondition())(gradient.copy())) == first).all()
    assert (np.asarray(pickle.loads(pickle.dumps(shuffle)).extract(gradient)) == first).all()
    assert np.abs(first.astype(int) - np.asarray(gradient)).mean() > 10


def test_shuffle_depends_on_the_image_and_grid(gradient: Image.Image) -> None:
    flipped = gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = np.asarray(build_condition(ShuffleCondition())(gradient))
    b = np.asarray(build_condition(ShuffleCondition())(flipped))
    assert not (a == b[:, ::-1]).all(), "different pixels give a different flow field"
    # A bigger grid is a smoother field: neighbouring pixels differ less.
    rough = np.asarray(build_condition(ShuffleCondition(grid=4))(gradient)).astype(int)
    smooth = np.asarray(build_condition(ShuffleCondition(grid=64))(gradient)).astype(int)
    assert np.abs(np.diff(smooth, axis=1)).mean() < np.abs(np.diff(rough, axis=1)).mean()


def _inputs() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([8, 8, 30, 30], fill=(200, 30, 30, 255))
    wide = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))
    return {
        "RGB": Image.new("RGB", (48, 40), (10, 20, 30)),
        "RGBA": rgba,
        "L": rgba.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgba.convert("RGB").convert("P"),
        "1": rgba.convert("1"),
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32)),
        "CMYK": rgba.convert("RGB").convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(_inputs()))
@pytest.mark.parametrize("cfg", WEIGHT_FREE, ids=lambda c: c.type)
def test_any_mode_in_rgb_of_the_same_size_out(cfg, mode: str) -> None:
    image = _inputs()[mode]
    assert image.mode == mode
    out = build_condition(cfg)(image)
    assert out.mode == "RGB" and out.size == image.size
    assert image.mode == mode, "the input is not modified"


def test_to_rgb_composites_over_white_and_scales_16_bit() -> None:
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert wide.mode == "I;16"
    assert [to_rgb(wide).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_canny_on_16_bit_matches_canny_on_8_bit(square: Image.Image) -> None:
    wide = Image.fromarray(np.asarray(square.convert("L")).astype(np.uint16) * 257)
    canny = build_condition(CannyCondition())
    assert (np.asarray(canny(wide)) == np.asarray(canny(square))).all()
