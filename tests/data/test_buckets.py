"""Aspect-ratio buckets in the dataset stage: which sizes exist, which one an image gets, how it is cut."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from recipe_runner.data.buckets import bucket_sizes, image_sizes, nearest_bucket
from recipe_runner.data.process import crop_box

BUCKETS = {"enabled": True, "step": 16}


@pytest.mark.parametrize(
    ("resolution", "step", "max_aspect"), [(512, 64, 2.0), (1024, 64, 2.5), (64, 16, 2.0)]
)
def test_buckets_keep_the_area_the_step_and_the_aspect_limit(resolution, step, max_aspect):
    sizes = bucket_sizes(resolution, step, max_aspect)
    assert (resolution, resolution) in sizes
    assert {(h, w) for w, h in sizes} == set(sizes)  # portrait and landscape alike
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= max_aspect
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)


def test_sd15_buckets_are_kohyas():
    assert bucket_sizes(512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((3000, 2000), (640, 384)),
        ((2000, 3000), (384, 640)),
        ((1000, 990), (512, 512)),
        ((800, 620), (576, 448)),
    ],
)
def test_an_image_gets_the_bucket_nearest_its_aspect_ratio(size, bucket):
    assert nearest_bucket(size, bucket_sizes(512, 64, 2.0)) == bucket


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (77, 77), (513, 512)])
def test_the_square_crop_is_unchanged_by_buckets(size):
    """aspect 1 gives the box the build cut before buckets existed (same floats: same pixels)."""
    for u in (None, np.random.default_rng(0)):
        w, h = size
        side = min(w, h)
        f = 0.5 if u is None else float(np.random.default_rng(0).random())
        x0, y0 = f * (w - side), f * (h - side)
        old = (x0 / w, y0 / h, (x0 + side) / w, (y0 + side) / h)
        assert crop_box(size, "center" if u is None else "random", u) == old


@pytest.mark.parametrize(
    ("size", "aspect"), [((300, 100), 80 / 48), ((100, 300), 48 / 80), ((90, 100), 80 / 48)]
)
def test_the_crop_box_has_the_buckets_aspect_and_is_as_large_as_fits(size, aspect):
    x0, y0, x1, y1 = crop_box(size, "center", None, aspect)
    w, h = (x1 - x0) * size[0], (y1 - y0) * size[1]
    assert w / h == pytest.approx(aspect)
    assert w == pytest.approx(size[0]) or h == pytest.approx(size[1])
    assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1


def test_image_sizes_reads_png_headers_and_lets_pillow_read_other_formats():
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    def encoded(size, fmt):
        buf = io.BytesIO()
        Image.new("RGB", size, "red").save(buf, format=fmt)
        return {"bytes": buf.getvalue(), "path": None}

    cells = [encoded((48, 80), "PNG"), encoded((80, 48), "JPEG"), encoded((64, 64), "PNG")]
    rows = Dataset.from_dict({"image": cells}, features=Features({"image": ImageFeature()}))
    assert image_sizes(rows) == [(48, 80), (80, 48), (64, 64)]


def test_build_cuts_each_image_to_its_bucket_and_counts_them(recipe, built, images, tmp_path, folder):
    """Landscape, portrait and square photos, with given conditioning images of another size (which must
    get the same crop): every row lands in its nearest bucket, and the report counts them."""
    for i, size in enumerate([(120, 72), (72, 120), (50, 50), (200, 110)]):
        images(f"data/{i}", 1, size=size)
        images(f"cond/{i}", 1, size=(size[0] * 2, size[1] * 2))
    meta = tmp_path / "data" / "metadata.jsonl"
    import json

    meta.write_text(
        "\n".join(json.dumps({"file_name": f"{i}/000.png", "text": f"photo {i}"}) for i in range(4))
    )
    loaded = recipe(
        {"source": {"path": "data", "conditioning_dir": "cond"}, "columns": {"prompt": "text"}},
        overrides=(
            "dataset.resolution=64",
            "dataset.buckets={enabled: true, step: 16}",
            "dataset.shuffle=false",
        ),
    )
    from rich.console import Console

    from recipe_runner.data.build import build_dataset

    console = Console(record=True, width=300, force_terminal=False)
    report = build_dataset(loaded, folder, console=console)
    assert report["buckets"] == {"48x80": 1, "64x64": 1, "80x48": 2}
    said = console.export_text()
    assert "aspect-ratio buckets (train rows): 48x80 1, 64x64 1, 80x48 2" in said
    # The default batch of 4 is more than any bucket has: their batches repeat rows.
    assert "fewer rows than a batch of 4: 48x80 (1), 64x64 (1), 80x48 (2)" in said
    train = built()["train"]
    assert [im.size for im in train["image"]] == [(80, 48), (48, 80), (64, 64), (80, 48)]
    assert [im.size for im in train["conditioning_image"]] == [(80, 48), (48, 80), (64, 64), (80, 48)]
    assert (folder.dataset / "preview.png").is_file()


def test_buckets_off_keep_the_cache_key_of_datasets_built_before_them(recipe):
    """Bucketing off is keyed as its absence: an upgrade does not rebuild every dataset."""
    from recipe_runner.data.cache_key import dataset_cache_key, key_inputs

    off = recipe({"source": {"builtin": "shapes"}})
    assert "buckets" not in key_inputs(off)["processing"]
    on = recipe({"source": {"builtin": "shapes"}, "buckets": BUCKETS})
    assert key_inputs(on)["processing"]["buckets"] == {**BUCKETS, "max_aspect": 2.0}
    assert dataset_cache_key(on) != dataset_cache_key(off)


@pytest.mark.parametrize(
    ("buckets", "words"),
    [
        ("{enabled: true, step: 64}", "resolution 96 is not a multiple of buckets.step 64"),
        ("{enabled: true, step: 12}", "must be a multiple of 8"),
        ("{enabled: true, max_aspect: 0.5}", "greater than or equal to 1"),
        ("{enabled: yes, stepp: 16}", "did you mean 'step'?"),
    ],
)
def test_bad_bucket_settings_are_refused_at_their_line(cli, write_recipe, buckets, words):
    path = write_recipe(
        f"""\
        name: t
        dataset:
          source: {{builtin: shapes}}
          resolution: 96
          buckets: {buckets}
        model: {{base: builtin:tiny-sd}}
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path.name}:5:" in result.output and words in result.output, result.output
