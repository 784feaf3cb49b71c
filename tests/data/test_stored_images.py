"""A source PNG whose pixels go into the dataset as they are is stored as its own bytes, not encoded
again; every other image is encoded from the pixels the build made (data/images.py)."""

from __future__ import annotations

import json

import datasets
import numpy as np
from PIL import Image

from tests.data.conftest import photo


def _stored(built, column: str) -> list[bytes]:
    rows = built()["train"].cast_column(column, datasets.Image(decode=False))
    return [cell["bytes"] for cell in rows[column]]


def test_png_sources_kept_as_they_are_only_where_the_pixels_are_unchanged(recipe, build, built, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the stored pixels are turned
    kinds = {
        "as-is": photo(32, 32, seed=1),  # RGB at the resolution: kept
        "resized": photo(48, 40, seed=2),
        "rgba": photo(32, 32, seed=3).convert("RGBA"),
        "rotated": photo(32, 32, seed=4),
    }
    rows = []
    for name, image in kinds.items():
        image.save(pics / f"{name}.png", **({"exif": exif} if name == "rotated" else {}))
        photo(32, 32, seed=9).save(pics / f"{name}-cond.png", compress_level=9)
        rows.append({"image": f"pics/{name}.png", "cond": f"pics/{name}-cond.png", "prompt": name})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    build(
        recipe(
            {"source": {"path": "rows.jsonl"}, "columns": {"conditioning_image": "cond"}, "shuffle": False}
        )
    )

    images, conds = _stored(built, "image"), _stored(built, "conditioning_image")
    files = [(pics / f"{name}.png").read_bytes() for name in kinds]
    assert [stored == file for stored, file in zip(images, files, strict=True)] == [True, False, False, False]
    cond_files = [(pics / f"{name}-cond.png").read_bytes() for name in kinds]
    # all 32 px RGB; the resized image's crop box (a 40 px square of 48 x 40) crops its conditioning image
    assert [stored == file for stored, file in zip(conds, cond_files, strict=True)] == [
        True,
        False,
        True,
        True,
    ]
    train = built()["train"]
    assert np.array_equal(np.asarray(train[0]["image"]), np.asarray(kinds["as-is"]))
    turned = np.asarray(kinds["rotated"])[::-1, ::-1]
    assert np.array_equal(np.asarray(train[3]["image"]), turned)
