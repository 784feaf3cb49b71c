"""What happens to each row: bad files, column mapping, prompts, image modes, sizes and crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recipe_runner.errors import UserError


def _metadata(root, rows):
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def pics(tmp_path, images):
    """A folder of 4 good images with prompts; returns the folder."""
    names = images("pics", 4)
    _metadata(
        tmp_path / "pics", [{"file_name": n, "prompt": f"p{i}", "name": f"n{i}"} for i, n in enumerate(names)]
    )
    return tmp_path / "pics"


def test_corrupt_and_truncated_images_are_dropped_and_named(recipe, build, built, pics):
    (pics / "001.png").write_bytes(b"this is not an image")
    data = (pics / "002.png").read_bytes()
    (pics / "002.png").write_bytes(data[: len(data) // 2])
    report = build(recipe({"source": {"path": "pics"}}))
    assert report["rows_out"] == {"train": 2} and report["rows_dropped"] == 2
    (unreadable,) = report["dropped"]["image: unreadable image"]["examples"]
    (truncated,) = report["dropped"]["image: truncated image"]["examples"]
    assert (unreadable["row"], unreadable["file"]) == (1, "001.png")
    assert (truncated["row"], truncated["file"]) == (2, "002.png") and "truncated" in truncated["detail"]
    assert sorted(built()["train"]["prompt"][:]) == ["p0", "p3"]


def test_on_bad_image_error_names_row_and_file(recipe, build, folder, pics):
    (pics / "003.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=r"row 3 \(003.png\): image: unreadable image") as e:
        build(recipe({"source": {"path": "pics"}, "filters": {"on_bad_image": "error"}, "num_proc": 2}))
    assert "on_bad_image: drop" in e.value.hint
    assert not folder.dataset.exists()


def test_missing_file_behind_a_path_column(recipe, build, pics):
    (pics / "000.png").unlink()
    report = build(recipe({"source": {"path": "pics"}}))
    (missing,) = report["dropped"]["image: missing file"]["examples"]
    assert (missing["row"], missing["file"]) == (0, "000.png")
    assert missing["detail"] == f"looked at {pics / '000.png'}"
    with pytest.raises(UserError, match=r"row 0 \(000.png\): image: missing file"):
        build(recipe({"source": {"path": "pics"}, "filters": {"on_bad_image": "error"}}))


def test_every_row_dropped_says_why(recipe, build, pics):
    with pytest.raises(UserError, match=r"all 4 rows were dropped \(image: smaller than min_size: 4"):
        build(recipe({"source": {"path": "pics"}, "filters": {"min_size": 100}}))


def test_min_size_drops_small_images(recipe, build, tmp_path, images, make_photo):
    names = images("mixed", 2, size=(20, 30))
    make_photo(64, 64).save(tmp_path / "mixed" / "big.png")
    _metadata(tmp_path / "mixed", [{"file_name": n, "prompt": "p"} for n in [*names, "big.png"]])
    report = build(recipe({"source": {"path": "mixed"}, "filters": {"min_size": 32}}))
    assert report["rows_out"] == {"train": 1}
    assert report["dropped"]["image: smaller than min_size"]["count"] == 2


def test_missing_column_lists_columns_and_suggests(recipe, build, folder, pics):
    with pytest.raises(
        UserError, match=r"dataset.columns.prompt: no column 'promt' .*columns: image, prompt, name"
    ) as e:
        build(recipe({"source": {"path": "pics"}, "columns": {"prompt": "promt"}}))
    assert e.value.hint == "did you mean 'prompt'?"
    assert not folder.dataset.exists()


def test_missing_conditioning_column(recipe, build, pics):
    with pytest.raises(UserError, match=r"dataset.columns.conditioning_image: no column 'edges'"):
        build(recipe({"source": {"path": "pics"}, "columns": {"conditioning_image": "edges"}}))


def test_prompt_template_and_constant(recipe, build, built, pics):
    build(
        recipe({"source": {"path": "pics"}, "prompt": "a photo of {name} ({prompt}) {{x}}", "shuffle": False})
    )
    assert built()["train"]["prompt"][:2] == ["a photo of n0 (p0) {x}", "a photo of n1 (p1) {x}"]
    build(recipe({"source": {"path": "pics"}, "prompt": "same for all"}))
    assert set(built()["train"]["prompt"][:]) == {"same for all"}


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("a {nmae}", r"placeholder \{nmae\}: no column 'nmae'.*columns: image, prompt, name"),
        ("a {", "not a valid template"),
        ("a {}", "not a valid template"),
    ],
)
def test_bad_prompt_templates(recipe, build, pics, template, words):
    with pytest.raises(UserError, match=words):
        build(recipe({"source": {"path": "pics"}, "prompt": template}))


def test_prompts_empty_non_string_and_invalid_utf8(recipe, build, built, tmp_path, images):
    names = images("odd", 4)
    lines = [
        json.dumps({"file_name": names[0], "prompt": ""}),
        json.dumps({"file_name": names[1], "prompt": 42}),
        f'{{"file_name": "{names[2]}", "prompt": "caf\xe9"}}',
        json.dumps({"file_name": names[3], "prompt": None}),
    ]
    (tmp_path / "odd" / "metadata.jsonl").write_bytes(
        b"\n".join(line.encode("utf-8") if "\xe9" not in line else line.encode("latin-1") for line in lines)
        + b"\n"
    )
    report = build(recipe({"source": {"path": "odd"}, "shuffle": False}))
    assert built()["train"]["prompt"][:] == ["", "42", "caf\ufffd", ""]
    assert report["warnings"]["prompt had invalid UTF-8 (replaced)"]["examples"] == [
        {"row": 2, "file": "002.png"}
    ]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_any_image_mode_comes_out_rgb(recipe, build, built, tmp_path, make_photo, mode):
    root = tmp_path / "modes"
    root.mkdir()
    rgb = make_photo(40, 40)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)  # 16-bit grey PNG
    else:
        img = rgb.convert(mode)
    ext = "tiff" if mode == "CMYK" else "png"
    img.save(root / f"x.{ext}")
    _metadata(root, [{"file_name": f"x.{ext}", "prompt": "p"}])
    report = build(recipe({"source": {"path": "modes"}, "resolution": 40}))
    assert report["rows_out"] == {"train": 1}
    out = built()["train"][0]["image"]
    assert out.mode == "RGB" and out.size == (40, 40)
    if mode == "I;16":  # 16-bit values are scaled down, not clipped to white
        assert np.array_equal(np.asarray(out)[..., 0], np.asarray(rgb.convert("L")))


def test_transparent_pixels_become_white(recipe, build, built, tmp_path):
    (tmp_path / "clear").mkdir()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear" / "x.png")
    _metadata(tmp_path / "clear", [{"file_name": "x.png", "prompt": "p"}])
    build(recipe({"source": {"path": "clear"}}))
    assert built()["train"][0]["image"].getpixel((5, 5)) == (255, 255, 255)


def test_conditioning_image_of_another_size_is_resized_and_counted(
    recipe, build, built, tmp_path, make_photo
):
    root = tmp_path / "pairs"
    root.mkdir()
    make_photo(64, 48, seed=1).save(root / "a.png")
    make_photo(32, 24, seed=2).save(root / "a_cond.png")  # same aspect, half the size
    make_photo(64, 48, seed=3).save(root / "b.png")
    make_photo(64, 48, seed=4).save(root / "b_cond.png")
    _metadata(
        root,
        [
            {"file_name": "a.png", "cond": "a_cond.png", "prompt": "a"},
            {"file_name": "b.png", "cond": "b_cond.png", "prompt": "b"},
        ],
    )
    report = build(
        recipe({"source": {"path": "pairs"}, "columns": {"conditioning_image": "cond"}, "shuffle": False})
    )
    rows = built()["train"]
    assert [r["conditioning_image"].size for r in rows] == [(32, 32), (32, 32)]
    warn = report["warnings"]["conditioning image resized to match its image"]
    assert warn["count"] == 1 and warn["examples"] == [{"row": 0, "file": "a.png"}]


def test_center_crop_keeps_the_middle(recipe, build, built, tmp_path):
    root = tmp_path / "wide"
    root.mkdir()
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255  # white middle third
    Image.fromarray(arr).save(root / "w.png")
    _metadata(root, [{"file_name": "w.png", "prompt": "p"}])
    build(recipe({"source": {"path": "wide"}}))
    out = np.asarray(built()["train"][0]["image"])
    assert out.min() >= 250


def test_random_crop_depends_on_seed_and_row_not_on_num_proc(recipe, build, built, tmp_path, images):
    images("wide", 6, size=(96, 32))
    _metadata(tmp_path / "wide", [{"file_name": f"{i:03d}.png", "prompt": str(i)} for i in range(6)])
    base = {"source": {"path": "wide"}, "crop": "random"}
    a = build(recipe(base))
    b = build(recipe({**base, "num_proc": 2, "batch_size": 1}), force=True)
    assert a["data_sha256"] == b["data_sha256"]
    c = build(recipe(base, seed=1))
    assert c["data_sha256"] != a["data_sha256"]
    d = build(recipe({**base, "crop": "center"}))
    assert d["data_sha256"] != a["data_sha256"]


def test_exif_orientation_is_applied(recipe, build, built, tmp_path):
    root = tmp_path / "phone"
    root.mkdir()
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = 255  # stored: left half white; orientation 6 shows it rotated, the white half on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(root / "p.jpg", quality=95, exif=exif)
    _metadata(root, [{"file_name": "p.jpg", "prompt": "p"}])
    build(recipe({"source": {"path": "phone"}}))
    out = np.asarray(built()["train"][0]["image"].convert("L")).astype(int)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


def test_large_jpegs_are_decoded_at_reduced_scale_with_the_same_result(
    recipe, build, built, tmp_path, make_photo
):
    root = tmp_path / "big"
    root.mkdir()
    big = make_photo(480, 320).resize((480, 320))
    big.save(root / "b.jpg", quality=95)
    _metadata(root, [{"file_name": "b.jpg", "prompt": "p"}])
    build(recipe({"source": {"path": "big"}}))
    out = np.asarray(built()["train"][0]["image"]).astype(int)
    reference = (
        Image.open(root / "b.jpg")
        .convert("RGB")
        .resize((32, 32), Image.Resampling.LANCZOS, box=(80, 0, 400, 320))
    )
    assert out.shape == (32, 32, 3)
    assert np.abs(out - np.asarray(reference).astype(int)).mean() < 12
