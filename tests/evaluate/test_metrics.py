"""Every metric on images whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from recipe_runner.data.builtin_shapes import PALETTE, make_sample
from recipe_runner.evaluate.metrics import (
    HIGHER_IS_BETTER,
    align_scale_shift,
    depth_error,
    edge_scores,
    landmark_chamfer,
    metrics_for,
    normal_error,
    palette_distance,
    ssim_score,
)
from recipe_runner.evaluate.shapes import mask_iou, parse_shape_prompt, shape_iou

N = 64


def square_outline(offset: int = 0, size: int = N) -> np.ndarray:
    """White 1-px square outline on black, shifted right by `offset` px."""
    img = np.zeros((size, size, 3), np.uint8)
    lo, hi = 16, 47
    img[lo, lo + offset : hi + offset + 1] = 255
    img[hi, lo + offset : hi + offset + 1] = 255
    img[lo : hi + 1, lo + offset] = 255
    img[lo : hi + 1, hi + offset] = 255
    return img


# --- edges ---


def test_identical_edges_score_one():
    s = edge_scores(square_outline(), square_outline(), tolerance=0)
    assert s == {"edge_precision": 1.0, "edge_recall": 1.0, "edge_f1": 1.0}


def test_one_pixel_shift_is_forgiven_by_tolerance_but_not_without():
    ref, shifted = square_outline(0), square_outline(1)
    assert edge_scores(ref, shifted, tolerance=2)["edge_f1"] == 1.0
    # Only the two horizontal edges overlap after the shift: 2 of 4 sides, less the corners.
    strict = edge_scores(ref, shifted, tolerance=0)
    assert strict["edge_f1"] < 0.55
    assert strict["edge_precision"] == pytest.approx(62 / 124)


def test_empty_against_edges_scores_zero_and_two_empties_agree():
    empty = np.zeros((N, N, 3), np.uint8)
    assert edge_scores(square_outline(), empty)["edge_f1"] == 0.0
    assert edge_scores(empty, square_outline())["edge_f1"] == 0.0
    assert edge_scores(empty, empty)["edge_f1"] == 1.0


def test_extra_edges_lower_precision_only():
    ref, new = square_outline(), square_outline()
    new[5, 5:15] = 255  # 10 spurious pixels far from any reference edge
    s = edge_scores(ref, new, tolerance=1)
    assert s["edge_recall"] == 1.0
    assert s["edge_precision"] == pytest.approx(124 / 134)


def test_dark_lines_on_white_are_read_as_edges():
    ref = 255 - square_outline(0)
    assert edge_scores(ref, 255 - square_outline(1), tolerance=2)["edge_f1"] == 1.0
    assert edge_scores(ref, np.full_like(ref, 255), tolerance=2)["edge_f1"] == 0.0


def test_pil_inputs_and_size_mismatch():
    ref = Image.fromarray(square_outline())
    assert edge_scores(ref, ref.resize((128, 128), Image.Resampling.NEAREST), tolerance=1)["edge_f1"] > 0.9


# --- colour palette ---


def test_palette_identical_is_zero_and_black_white_is_100():
    black, white = np.zeros((N, N, 3), np.uint8), np.full((N, N, 3), 255, np.uint8)
    assert palette_distance(black, black)["palette_delta_e"] == 0.0
    assert palette_distance(black, white)["palette_delta_e"] == pytest.approx(100, abs=0.01)


def test_palette_half_the_cells_changed():
    ref = np.zeros((N, N, 3), np.uint8)
    new = ref.copy()
    new[:, : N // 2] = 255  # left 4 of 8 columns of cells black -> white
    assert palette_distance(ref, new, grid_size=8)["palette_delta_e"] == pytest.approx(50, abs=0.01)


def test_palette_colour_change_is_positive_and_symmetric():
    red = np.zeros((N, N, 3), np.uint8) + np.array(PALETTE["red"], np.uint8)
    orange = np.zeros((N, N, 3), np.uint8) + np.array(PALETTE["orange"], np.uint8)
    d = palette_distance(red, orange)["palette_delta_e"]
    assert d > 10
    assert palette_distance(orange, red)["palette_delta_e"] == pytest.approx(d, rel=1e-5)


# --- face landmarks ---


def dots(points: list[tuple[int, int]]) -> np.ndarray:
    img = np.zeros((N, N, 3), np.uint8)
    for y, x in points:
        img[y, x] = (0, 255, 0)
    return img


def test_face_chamfer_known_distances():
    pts = [(20, 20), (20, 40), (40, 30)]
    assert landmark_chamfer(dots(pts), dots(pts)) == {"face_chamfer": 0.0, "face_found": 1.0}
    moved = [(y + 3, x + 4) for y, x in pts]  # every landmark moved by 5 px
    s = landmark_chamfer(dots(pts), dots(moved))
    assert s["face_chamfer"] == pytest.approx(5 / math.hypot(N, N), rel=1e-3)


def test_face_missing_is_worst():
    empty = np.zeros((N, N, 3), np.uint8)
    assert landmark_chamfer(dots([(10, 10)]), empty) == {"face_chamfer": 1.0, "face_found": 0.0}
    assert landmark_chamfer(empty, empty)["face_chamfer"] == 0.0


# --- depth and normals ---


def ramp() -> np.ndarray:
    y, x = np.mgrid[0:N, 0:N]
    return ((x + y) / (2 * (N - 1)) * 200 + 30).astype(np.uint8)


def test_depth_scaled_and_shifted_has_no_error_after_alignment():
    ref = ramp().astype(np.float64)
    new = np.clip(0.5 * ref + 40, 0, 255)  # a different scale and shift, same layout
    s = depth_error(ref.astype(np.uint8), new.round().astype(np.uint8))
    assert s["depth_rmse"] < 2 / 255
    assert s["depth_abs_rel"] < 0.02


def test_depth_flat_prediction_errs_by_the_reference_spread():
    ref = ramp()
    s = depth_error(ref, np.full_like(ref, 128))
    assert s["depth_rmse"] == pytest.approx((ref / 255.0).std(), rel=1e-6)


def test_align_scale_shift_recovers_exact_affine():
    pred = np.linspace(0, 1, 100).reshape(10, 10)
    np.testing.assert_allclose(align_scale_shift(pred, 3 * pred - 0.5), 3 * pred - 0.5, atol=1e-12)


def test_depth_abs_rel_is_nan_without_valid_pixels():
    black = np.zeros((N, N), np.uint8)
    assert math.isnan(depth_error(black, black)["depth_abs_rel"])


def test_normals_identical_and_flipped():
    up = np.zeros((N, N, 3), np.uint8) + np.array([128, 128, 255], np.uint8)
    down = np.zeros((N, N, 3), np.uint8) + np.array([128, 128, 0], np.uint8)
    assert normal_error(up, up) == pytest.approx({"normal_rmse": 0.0, "normal_angle_deg": 0.0}, abs=1e-6)
    assert normal_error(up, down)["normal_angle_deg"] == pytest.approx(180, abs=1.0)


# --- SSIM ---


def test_ssim_identical_is_one_and_noise_is_low():
    img = np.zeros((N, N, 3), np.uint8)
    img[:, : N // 2] = 200
    noise = np.random.default_rng(0).integers(0, 256, (N, N, 3), dtype=np.uint8)
    assert ssim_score(img, img)["ssim"] == pytest.approx(1.0)
    assert ssim_score(img, noise)["ssim"] < 0.2


# --- shapes ---


def square_image(x0: int, color: str = "red", background: str = "teal") -> np.ndarray:
    img = np.zeros((N, N, 3), np.uint8) + np.array(PALETTE[background], np.uint8)
    img[10:30, x0 : x0 + 20] = PALETTE[color]
    return img


def test_iou_of_two_known_squares():
    prompt = "a red square on a teal background"
    # 20x20 squares offset by 10 px: overlap 20x10 = 200, union 600.
    assert shape_iou(square_image(10), square_image(20), prompt) == {"shape_iou": pytest.approx(1 / 3)}
    assert shape_iou(square_image(10), square_image(10), prompt)["shape_iou"] == 1.0
    assert shape_iou(square_image(10), square_image(10, color="yellow"), prompt)["shape_iou"] == 0.0


def test_iou_on_a_builtin_sample_matches_its_mask():
    row = make_sample(3, seed=0, resolution=N)
    assert shape_iou(row["image"], row["image"], row["prompt"])["shape_iou"] == 1.0
    mask = np.asarray(row["mask"]) > 0
    found = np.linalg.norm(np.asarray(row["image"], np.float32) - PALETTE[row["color"]], axis=2) <= 36
    assert mask_iou(mask, found) > 0.9


def test_shape_prompts_parse_multiword_colours_and_others_are_skipped():
    assert parse_shape_prompt("a navy blue star on an orange background") == {
        "color": "navy blue",
        "shape": "star",
        "background": "orange",
    }
    assert parse_shape_prompt("a photo of a cat") is None
    assert shape_iou(square_image(10), square_image(10), "a photo of a cat") == {}


# --- dispatch ---


@pytest.mark.parametrize(
    ("ctype", "keys"),
    [
        ("canny", {"edge_precision", "edge_recall", "edge_f1"}),
        ("hed", {"edge_precision", "edge_recall", "edge_f1"}),
        ("color_palette", {"palette_delta_e"}),
        ("mediapipe_face", {"face_chamfer", "face_found"}),
        ("depth", {"depth_rmse", "depth_abs_rel"}),
        ("normal", {"normal_rmse", "normal_angle_deg"}),
        ("openpose", {"ssim"}),
        ("segmentation", {"ssim"}),
        ("shuffle", {"ssim"}),
        ("custom", {"ssim"}),
    ],
)
def test_metrics_for_every_condition_type(ctype, keys):
    img = square_outline()
    # Every setting can be passed to every metric; each takes the ones it knows.
    scores = metrics_for(ctype)(img, img, tolerance=2, grid_size=8)
    assert set(scores) == keys
    assert keys <= set(HIGHER_IS_BETTER)


def test_metrics_for_covers_every_recipe_condition_type():
    from recipe_runner.recipe.condition import CONDITION_TYPES

    img = square_outline()
    for ctype in CONDITION_TYPES:
        assert metrics_for(ctype)(img, img, tolerance=0)
