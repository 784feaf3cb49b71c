"""`evaluate_pipeline` with stand-in pipelines: which inputs each gets, and how scores are gathered."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from recipe_runner.conditions import build_condition
from recipe_runner.data.builtin_shapes import make_sample
from recipe_runner.evaluate import evaluate_pipeline
from recipe_runner.recipe.condition import CannyCondition, CustomCondition
from recipe_runner.recipe.sections import EvaluateSpec


class FakePipe:
    """Returns the conditioning image it was given (a perfect ControlNet), or noise when given none."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kw):
        self.calls.append(kw)
        seed = kw["generator"].initial_seed()
        if "image" in kw:
            out = kw["image"]
        else:
            noise = np.random.default_rng(seed).integers(
                0, 256, (kw["height"], kw["width"], 3), dtype=np.uint8
            )
            out = Image.fromarray(noise)
        return SimpleNamespace(images=[out])


ROWS = [make_sample(i, seed=0, resolution=64) for i in range(3)]
SPEC = EvaluateSpec(num_inference_steps=3, guidance_scale=2.5, tolerance=1)


@pytest.fixture
def identity_condition(tmp_path: Path):
    (tmp_path / "conds.py").write_text("def same(image):\n    return image\n")
    cond = build_condition(CustomCondition(function="conds:same"), base_dir=tmp_path)
    cond.setup()
    return cond


def test_custom_condition_scores_with_ssim_and_both_pipelines_share_seeds(identity_condition):
    ours, base = FakePipe(), FakePipe()
    out = evaluate_pipeline(ours, base, ROWS, identity_condition, SPEC, seed=10)
    assert out["mean"]["ours"]["ssim"] == pytest.approx(1.0)
    assert out["mean"]["baseline"]["ssim"] < 0.2
    assert [c["generator"].initial_seed() for c in ours.calls] == [10, 11, 12]
    assert [c["generator"].initial_seed() for c in base.calls] == [10, 11, 12]
    assert all("image" in c for c in ours.calls) and not any("image" in c for c in base.calls)
    assert {(c["num_inference_steps"], c["guidance_scale"], c["width"]) for c in ours.calls} == {(3, 2.5, 64)}
    assert [r["prompt"] for r in out["rows"]] == [r["prompt"] for r in ROWS]
    assert (
        len(out["images"]["ours"]) == len(out["images"]["baseline"]) == len(out["images"]["condition"]) == 3
    )


def test_without_a_base_pipeline_only_ours_is_scored_and_shapes_iou_is_optional():
    cond = build_condition(CannyCondition())
    ticks = []
    out = evaluate_pipeline(FakePipe(), None, ROWS, cond, SPEC, seed=0, on_row=lambda: ticks.append(1))
    assert set(out["mean"]) == {"ours"}
    assert "shape_iou" not in out["mean"]["ours"]
    assert len(ticks) == 3
    with_iou = evaluate_pipeline(FakePipe(), None, ROWS, cond, SPEC, seed=0, shapes=True)
    # The fake returns the outline, not the filled shape: almost none of it is the shape's colour.
    assert with_iou["mean"]["ours"]["shape_iou"] < 0.1


class TruthPipe:
    """A perfect ControlNet for data whose conditions are drawn another way: it gives back the row's image."""

    def __init__(self, rows):
        self.by_prompt = {r["prompt"]: r["image"] for r in rows}

    def __call__(self, **kw):
        return SimpleNamespace(images=[self.by_prompt[kw["prompt"]]])


def test_conditions_of_another_kind_are_compared_like_with_like():
    """Data shipping thick hand-drawn outlines, a canny recipe: re-extracted canny edges of a perfect image
    match canny edges of the held-out image, not the outline drawing."""
    import cv2

    cond = build_condition(CannyCondition())
    rows = []
    for i, row in enumerate(ROWS):
        edges = np.asarray(cond.extract(row["image"]).convert("L"))
        thick = cv2.dilate(edges, np.ones((5, 5), np.uint8))  # the same outline, drawn with a thick pen
        rows.append({**row, "prompt": f"{row['prompt']} #{i}", "conditioning_image": Image.fromarray(thick)})
    given = evaluate_pipeline(TruthPipe(rows), None, rows, cond, SPEC, seed=0, reference="conditioning_image")
    extracted = evaluate_pipeline(TruthPipe(rows), None, rows, cond, SPEC, seed=0, reference="image")
    assert extracted["mean"]["ours"]["edge_f1"] == pytest.approx(1.0)
    assert given["mean"]["ours"]["edge_f1"] < 0.9
    # The grid still shows what the ControlNet was given.
    assert np.array_equal(
        np.asarray(extracted["images"]["condition"][0].convert("L")),
        np.asarray(rows[0]["conditioning_image"]),
    )
