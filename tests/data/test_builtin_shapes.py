"""The offline shapes dataset: deterministic, well-formed rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFilter

from recipe_runner.data.builtin_shapes import COLORS, PALETTE, SHAPES, generate, make_sample


def _bytes(row: dict) -> tuple[bytes, bytes, bytes]:
    return row["image"].tobytes(), row["conditioning_image"].tobytes(), row["mask"].tobytes()


def test_same_seed_and_index_give_identical_rows():
    a, b = make_sample(7, seed=3, resolution=64), make_sample(7, seed=3, resolution=64)
    assert _bytes(a) == _bytes(b)
    assert a["prompt"] == b["prompt"]


def test_rows_differ_across_seeds_and_indices():
    base = _bytes(make_sample(0, seed=0, resolution=64))
    assert _bytes(make_sample(0, seed=1, resolution=64)) != base
    assert _bytes(make_sample(1, seed=0, resolution=64)) != base


def test_generate_matches_make_sample():
    rows = list(generate(5, seed=2, resolution=32))
    assert len(rows) == 5
    assert _bytes(rows[4]) == _bytes(make_sample(4, seed=2, resolution=32))


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_sizes_and_modes(resolution: int):
    row = make_sample(0, seed=0, resolution=resolution)
    assert row["image"].mode == "RGB" and row["conditioning_image"].mode == "RGB"
    assert row["mask"].mode == "L"
    for key in ("image", "conditioning_image", "mask"):
        assert row[key].size == (resolution, resolution)


def test_prompt_names_shape_and_both_colours():
    for row in generate(40, seed=5):
        assert row["shape"] in SHAPES
        assert row["color"] in COLORS and row["background"] in COLORS
        assert row["color"] != row["background"]
        assert row["prompt"].split()[1 : 1 + len(row["color"].split())] == row["color"].split()
        assert f" {row['shape']} on " in row["prompt"]
        assert row["prompt"].endswith(f" {row['background']} background")


def test_all_shapes_and_colours_appear():
    rows = list(generate(200, seed=0))
    assert {r["shape"] for r in rows} == set(SHAPES)
    assert {r["color"] for r in rows} == set(COLORS)


def test_mask_area_and_image_colours():
    for row in generate(40, seed=1, resolution=64):
        mask = np.asarray(row["mask"]) > 0
        assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
        assert 0.02 < mask.mean() < 0.4, row["prompt"]
        # The shape never touches the frame.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        # Deep inside / far outside the shape, the image is exactly the named colours.
        image = np.asarray(row["image"]).astype(int)
        # (Lanczos rings for ~3px, hence the 7px filters.)
        inner = np.asarray(row["mask"].filter(ImageFilter.MinFilter(7))) > 0
        outer = np.asarray(row["mask"].filter(ImageFilter.MaxFilter(7))) == 0
        assert np.abs(image[inner] - PALETTE[row["color"]]).max() <= 2
        assert np.abs(image[outer] - PALETTE[row["background"]]).max() <= 2


def test_outline_lies_on_the_mask_boundary():
    for row in generate(40, seed=2, resolution=64):
        cond = np.asarray(row["conditioning_image"])
        assert (cond[..., 0] == cond[..., 1]).all() and (cond[..., 1] == cond[..., 2]).all()  # grey only
        outline = cond[..., 0] > 128
        assert outline.sum() > 20
        # Boundary band: within 3px of an edge of the mask (inside or outside).
        band_lo = row["mask"].filter(ImageFilter.MinFilter(7))
        band_hi = row["mask"].filter(ImageFilter.MaxFilter(7))
        band = (np.asarray(band_hi) > 0) & ~(np.asarray(band_lo) > 0)
        assert band[outline].all(), row["prompt"]
        # And the outline covers the boundary: few edge pixels are far from it.
        mask = np.asarray(row["mask"]) > 0
        edge = mask & ~(np.asarray(row["mask"].filter(ImageFilter.MinFilter(3))) > 0)
        near_outline = (
            np.asarray(row["conditioning_image"].convert("L").filter(ImageFilter.MaxFilter(5))) > 64
        )
        assert near_outline[edge].mean() > 0.95, row["prompt"]


def test_outline_width_scales_with_resolution():
    small = (np.asarray(make_sample(0, seed=0, resolution=64)["conditioning_image"])[..., 0] > 128).sum()
    large = (np.asarray(make_sample(0, seed=0, resolution=256)["conditioning_image"])[..., 0] > 128).sum()
    # Same shape, 4x the resolution: 4x the perimeter and 4x the width -> ~16x the pixels.
    assert 10 < large / small < 22
