"""Condition-fidelity metrics: how close the condition re-extracted from a generated image is to the input.

Pure NumPy/OpenCV, one function per kind of condition, each taking two conditioning images (PIL or uint8
arrays, the reference first) and returning `{metric name: float}`. `metrics_for(type)` picks the function
for a recipe's `condition.type`; `HIGHER_IS_BETTER` says which way each metric improves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image

from recipe_runner.errors import UserError

Metric = Callable[..., dict[str, float]]

HIGHER_IS_BETTER: dict[str, bool] = {
    "edge_precision": True,
    "edge_recall": True,
    "edge_f1": True,
    "palette_delta_e": False,
    "face_chamfer": False,
    "face_found": True,
    "depth_rmse": False,
    "depth_abs_rel": False,
    "normal_rmse": False,
    "normal_angle_deg": False,
    "ssim": True,
    "shape_iou": True,
}


def as_rgb(image: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """A uint8 HxWx3 array; resized to `size` (width, height) when given and different."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {arr.dtype}")
    if size is not None and (arr.shape[1], arr.shape[0]) != size:
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    return arr


def _pair(ref: Any, new: Any) -> tuple[np.ndarray, np.ndarray]:
    # Generated images normally match the condition's size; resize the new one if not, never the reference.
    a = as_rgb(ref)
    return a, as_rgb(new, (a.shape[1], a.shape[0]))


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of `mask` (which must have one)."""
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


# --- edges: canny, scribble, hed, lineart, mlsd ---------------------------------------------------------


def edge_maps(ref: Any, new: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary edge maps (grey > 127). Edge maps are sparse, so a reference that is mostly bright is taken
    to be dark lines on white and both maps are inverted."""
    a, b = (_grey(x) for x in _pair(ref, new))
    ea, eb = a > 127, b > 127
    if ea.mean() > 0.5:
        ea, eb = ~ea, ~eb
    return ea, eb


def edge_scores(ref: Any, new: Any, *, tolerance: int = 2) -> dict[str, float]:
    """Precision, recall and F1 of edge pixels, matched within `tolerance` pixels (Euclidean).

    A new edge pixel is correct when a reference edge lies within the tolerance (precision); a reference
    edge pixel is found when a new edge lies within it (recall), as in the BSDS boundary benchmark but
    without its one-to-one matching. Two empty maps agree perfectly (1.0); one empty map scores 0.
    """
    r, n = edge_maps(ref, new)
    if not r.any() or not n.any():
        same = float(not r.any() and not n.any())
        return {"edge_precision": same, "edge_recall": same, "edge_f1": same}
    precision = float((_distance_to(r)[n] <= tolerance).mean())
    recall = float((_distance_to(n)[r] <= tolerance).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"edge_precision": precision, "edge_recall": recall, "edge_f1": f1}


# --- colour palette -------------------------------------------------------------------------------------


def palette_distance(ref: Any, new: Any, *, grid_size: int = 8) -> dict[str, float]:
    """Mean CIELAB ΔE (CIE76) between the palettes' cells, on a `grid_size` x `grid_size` grid.

    CIELAB rather than RGB because equal distances there look about equally different (ΔE ≈ 2.3 is a
    just-noticeable difference; black vs white is 100). Each cell's colour is the area average, which is
    exact for the mosaic the color_palette condition draws.
    """
    cells = [
        cv2.resize(x, (grid_size, grid_size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        for x in _pair(ref, new)
    ]
    lab_a, lab_b = (cv2.cvtColor(c, cv2.COLOR_RGB2LAB) for c in cells)
    return {"palette_delta_e": float(np.linalg.norm(lab_a - lab_b, axis=2).mean())}


# --- face landmarks -------------------------------------------------------------------------------------


def landmark_chamfer(ref: Any, new: Any) -> dict[str, float]:
    """Symmetric chamfer distance between two landmark drawings, as a fraction of the image diagonal.

    The condition is a drawing, not landmark coordinates, so this stands in for mean landmark error: the
    mean distance from each drawn pixel of one to the nearest drawn pixel of the other, averaged over both
    directions. Drawn pixels are those with any channel above 16 (the background is black). Two empty
    drawings give 0; one empty drawing gives 1, the worst value. `face_found` is 1 when the new drawing
    has any face at all.
    """
    a, b = _pair(ref, new)
    da, db = a.max(axis=2) > 16, b.max(axis=2) > 16
    found = float(db.any())
    if not da.any() or not db.any():
        return {"face_chamfer": 0.0 if da.any() == db.any() else 1.0, "face_found": found}
    diagonal = float(np.hypot(*da.shape))
    chamfer = 0.5 * (_distance_to(da)[db].mean() + _distance_to(db)[da].mean())
    return {"face_chamfer": float(chamfer / diagonal), "face_found": found}


# --- depth and normals ----------------------------------------------------------------------------------


def align_scale_shift(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """`s * pred + t` with s, t minimising the squared error to `ref` (MiDaS's evaluation alignment).

    Monocular depth is only defined up to scale and shift, so an unaligned error would punish a correct
    relative layout. A constant prediction aligns to the reference's mean.
    """
    p, r = pred.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    design = np.stack([p, np.ones_like(p)], axis=1)
    (s, t), *_ = np.linalg.lstsq(design, r, rcond=None)
    return (s * pred + t).astype(np.float64)


def depth_error(ref: Any, new: Any, *, min_depth: float = 0.1) -> dict[str, float]:
    """RMSE and mean relative error of depth maps on [0, 1] after scale-and-shift alignment.

    The maps are grey (MiDaS writes inverse depth: near is bright). `depth_abs_rel` = mean |aligned - ref|
    / ref over pixels whose reference is at least `min_depth`, since relative error near 0 is meaningless;
    NaN when there are none.
    """
    a, b = (_grey(x).astype(np.float64) / 255.0 for x in _pair(ref, new))
    aligned = align_scale_shift(b, a)
    rmse = float(np.sqrt(np.mean((aligned - a) ** 2)))
    valid = a >= min_depth
    abs_rel = float(np.mean(np.abs(aligned - a)[valid] / a[valid])) if valid.any() else float("nan")
    return {"depth_rmse": rmse, "depth_abs_rel": abs_rel}


def normal_error(ref: Any, new: Any) -> dict[str, float]:
    """Normal maps: RMSE on [0, 1] after per-channel scale-and-shift alignment, and mean angle in degrees.

    The angle compares the unaligned normals (RGB decoded to [-1, 1] and normalised), which is the usual
    normal-estimation measure; the RMSE follows the depth metric and forgives a global colour scaling.
    """
    a, b = (x.astype(np.float64) / 255.0 for x in _pair(ref, new))
    aligned = np.stack([align_scale_shift(b[..., c], a[..., c]) for c in range(3)], axis=2)
    rmse = float(np.sqrt(np.mean((aligned - a) ** 2)))
    va, vb = a * 2 - 1, b * 2 - 1
    va /= np.maximum(np.linalg.norm(va, axis=2, keepdims=True), 1e-8)
    vb /= np.maximum(np.linalg.norm(vb, axis=2, keepdims=True), 1e-8)
    cos = np.clip((va * vb).sum(axis=2), -1.0, 1.0)
    return {"normal_rmse": rmse, "normal_angle_deg": float(np.degrees(np.arccos(cos)).mean())}


# --- generic fallback -----------------------------------------------------------------------------------


def ssim_score(ref: Any, new: Any) -> dict[str, float]:
    """Structural similarity of the two conditioning images (colour, 7x7 windows; 1 means identical)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise UserError(
            "evaluating this condition needs scikit-image (SSIM), which is not installed",
            hint="pip install scikit-image",
        ) from None
    a, b = _pair(ref, new)
    side = min(a.shape[:2])
    win = min(7, side if side % 2 else side - 1)  # skimage needs an odd window no bigger than the image
    return {"ssim": float(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=win))}


_BY_TYPE: dict[str, Metric] = {
    **dict.fromkeys(("canny", "scribble", "hed", "lineart", "mlsd"), edge_scores),
    "color_palette": palette_distance,
    "mediapipe_face": landmark_chamfer,
    "depth": depth_error,
    "normal": normal_error,
}


def metrics_for(condition_type: str) -> Metric:
    """The metric function for a `condition.type`; SSIM for custom, shuffle, segmentation and openpose.

    The returned callable takes `(ref_cond, new_cond, **kw)` and passes on only the keywords its metric
    accepts (`tolerance` for edges, `grid_size` for palettes), so callers can give every setting they have.
    """
    fn = _BY_TYPE.get(condition_type, ssim_score)
    accepted = set(inspect.signature(fn).parameters) - {"ref", "new"}

    def metric(ref_cond: Any, new_cond: Any, **kw: Any) -> dict[str, float]:
        return fn(ref_cond, new_cond, **{k: v for k, v in kw.items() if k in accepted})

    metric.__name__ = fn.__name__
    metric.__doc__ = fn.__doc__
    return metric
