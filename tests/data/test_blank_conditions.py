"""Conditioning images of one flat colour and empty prompts: counted, explained, optionally dropped."""

from __future__ import annotations

import json

from PIL import Image
from rich.console import Console

from recipe_runner.data.build import build_dataset
from recipe_runner.data.process import blank


def _folder(tmp_path, flat: int, textured: int, make_photo, prompt=lambda i: f"photo {i}"):
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i in range(flat + textured):
        image = Image.new("RGB", (40, 40), (90, 120, 200)) if i < flat else make_photo(40, 40, seed=i)
        image.save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": prompt(i)}))
    (root / "metadata.jsonl").write_text("\n".join(lines))


def _build(recipe, folder, **filters):
    loaded = recipe(
        {"source": {"path": "data"}, "columns": {"prompt": "text"}, "shuffle": False, "filters": filters},
        condition={"type": "canny", "low_threshold": 100, "high_threshold": 200},
    )
    console = Console(record=True, width=300, force_terminal=False)
    return build_dataset(loaded, folder, console=console), console.export_text()


def test_blank_is_one_flat_colour_in_every_band():
    assert blank(Image.new("L", (8, 8), 0)) and blank(Image.new("RGB", (8, 8), (1, 2, 3)))
    dot = Image.new("RGB", (8, 8))
    dot.putpixel((3, 3), (0, 0, 1))
    assert not blank(dot)


def test_flat_images_give_blank_canny_conditions_that_the_build_names(recipe, folder, tmp_path, make_photo):
    _folder(tmp_path, flat=3, textured=5, make_photo=make_photo)
    report, said = _build(recipe, folder)
    assert report["warnings"]["blank conditioning image"]["count"] == 3
    assert [e["row"] for e in report["warnings"]["blank conditioning image"]["examples"]] == [0, 1, 2]
    assert report["rows_out"]["train"] == 8  # kept by default
    assert "3 rows: blank conditioning image (e.g. row 0 000.png)" in said
    assert "3 of 8 conditioning images (38%) are one flat colour: the canny condition found no edges" in said
    assert "lower its thresholds (100/200)" in said and "on_blank_conditioning: drop" in said


def test_blank_conditions_can_be_dropped(recipe, folder, tmp_path, make_photo):
    _folder(tmp_path, flat=3, textured=5, make_photo=make_photo)
    report, _ = _build(recipe, folder, on_blank_conditioning="drop")
    assert report["rows_out"]["train"] == 5 and report["rows_dropped"] == 3
    assert report["dropped"]["conditioning_image: blank (one flat colour)"]["count"] == 3
    assert "blank conditioning image" not in report["warnings"]


def test_a_few_blanks_are_counted_without_a_warning(recipe, folder, tmp_path, make_photo):
    _folder(tmp_path, flat=1, textured=24, make_photo=make_photo)
    _, said = _build(recipe, folder)
    assert "1 row: blank conditioning image" in said and "warning" not in said


def test_empty_prompts_are_counted(recipe, folder, tmp_path, make_photo):
    _folder(tmp_path, flat=0, textured=4, make_photo=make_photo, prompt=lambda i: "" if i % 2 else " a photo")
    report, said = _build(recipe, folder)
    assert report["warnings"]["empty prompt"]["count"] == 2
    assert "2 rows: empty prompt (e.g. row 1 001.png)" in said


def test_keeping_blanks_keeps_the_cache_key_of_earlier_builds(recipe):
    from recipe_runner.data.cache_key import dataset_cache_key, key_inputs

    keep = recipe({"source": {"builtin": "shapes"}})
    assert "on_blank_conditioning" not in key_inputs(keep)["processing"]["filters"]
    drop = recipe({"source": {"builtin": "shapes"}, "filters": {"on_blank_conditioning": "drop"}})
    assert key_inputs(drop)["processing"]["filters"]["on_blank_conditioning"] == "drop"
    assert dataset_cache_key(drop) != dataset_cache_key(keep)
