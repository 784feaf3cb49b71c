"""The dataset stage as a user sees it: what lands in the run folder, caching, determinism, failures."""

from __future__ import annotations

import json
import time

import pytest

from recipe_runner.data.build import build_dataset, dataset_cache_key, dataset_status
from recipe_runner.errors import UserError

SHAPES = {"source": {"builtin": "shapes", "num_samples": 24}, "resolution": 32}


def test_builtin_shapes_build_rows_columns_sizes_and_files(recipe, build, built, folder):
    report = build(recipe({**SHAPES, "holdout": 4}))

    dd = built()
    assert set(dd) == {"train", "holdout"}
    assert (len(dd["train"]), len(dd["holdout"])) == (20, 4)
    assert dd["train"].column_names == ["image", "conditioning_image", "prompt"]
    row = dd["holdout"][0]
    for key in ("image", "conditioning_image"):
        assert row[key].mode == "RGB" and row[key].size == (32, 32)
    assert row["prompt"].endswith("background")
    assert (folder.dataset / "preview.png").is_file()
    assert (folder.dataset / ".complete").is_file()
    on_disk = json.loads((folder.dataset / "report.json").read_text())
    assert on_disk["cache_key"] == report["cache_key"] == dataset_cache_key(recipe({**SHAPES, "holdout": 4}))
    assert report["rows_out"] == {"train": 20, "holdout": 4}
    assert report["rows_in"] == 24 and report["rows_dropped"] == 0 and not report["cached"]
    for key in ("source_fingerprint", "seconds", "rows_per_second", "num_proc", "created_at", "data_sha256"):
        assert key in report


def test_rebuild_gives_identical_bytes_whatever_num_proc(recipe, build, built):
    first = build(recipe(SHAPES))
    rows = built()["train"]["prompt"][:]
    second = build(recipe({**SHAPES, "num_proc": 2, "batch_size": 5}), force=True)
    assert second["data_sha256"] == first["data_sha256"]
    assert second["source_fingerprint"] == first["source_fingerprint"]
    assert built()["train"]["prompt"][:] == rows


def test_holdout_is_the_last_rows_after_shuffling_and_never_in_train(recipe, build, built):
    build(recipe({**SHAPES, "holdout": 5}))
    dd = built()
    train = {r["image"].tobytes() for r in dd["train"]}
    assert not any(r["image"].tobytes() in train for r in dd["holdout"])


def test_shuffle_and_max_samples(recipe, build, built):
    build(recipe({**SHAPES, "shuffle": False, "max_samples": 6}))
    from recipe_runner.data.builtin_shapes import make_sample

    prompts = built()["train"]["prompt"][:]
    assert prompts == [make_sample(i, seed=0, resolution=32)["prompt"] for i in range(6)]
    report = build(recipe({**SHAPES, "shuffle": True, "max_samples": 6}))
    assert report["rows_out"] == {"train": 6}
    assert built()["train"]["prompt"][:] != prompts  # same seed, other order (24 rows: a tie is unlikely)


def test_second_build_is_a_fast_cache_hit(recipe, build, folder):
    loaded = recipe(SHAPES)
    first = build(loaded)
    assert dataset_status(loaded, folder)[0] is True
    start = time.perf_counter()
    again = build(recipe(SHAPES))
    assert time.perf_counter() - start < 1.0
    assert again["cached"] is True and again["cache_key"] == first["cache_key"]
    # num_proc and batch_size change how fast, not what: still cached
    assert build(recipe({**SHAPES, "num_proc": 2, "batch_size": 3}))["cached"] is True


def test_changing_canny_thresholds_rebuilds_and_status_says_why(recipe, build, folder):
    build(recipe(SHAPES))
    changed = recipe(SHAPES, condition={"type": "canny", "low_threshold": 50, "high_threshold": 150})
    cached, why = dataset_status(changed, folder)
    assert not cached and "condition changed" in why and "low_threshold" in why
    assert build(changed)["cached"] is False
    assert dataset_status(changed, folder)[0] is True


@pytest.mark.parametrize(
    ("change", "words"),
    [({"resolution": 48}, "dataset settings changed (resolution: 32 -> 48)"), ({"seed": 3}, "seed changed")],
)
def test_status_names_what_changed(recipe, build, folder, change, words):
    build(recipe(SHAPES))
    seed = change.pop("seed", 0)
    cached, why = dataset_status(recipe({**SHAPES, **change}, seed=seed), folder)
    assert not cached and words in why


def test_status_without_a_dataset_or_with_an_unfinished_one(recipe, build, folder):
    assert dataset_status(recipe(SHAPES), folder) == (False, "no dataset yet")
    build(recipe(SHAPES))
    (folder.dataset / ".complete").unlink()
    cached, why = dataset_status(recipe(SHAPES), folder)
    assert not cached and "incomplete" in why
    assert build(recipe(SHAPES))["cached"] is False


def test_given_conditioning_images_make_the_condition_irrelevant_to_the_cache(recipe, build, built):
    from recipe_runner.data.builtin_shapes import make_sample

    given = {**SHAPES, "shuffle": False, "columns": {"conditioning_image": "conditioning_image"}}
    first = build(recipe(given))
    assert first["columns"]["conditioning_image"] == "conditioning_image"
    stored = built()["train"][3]["conditioning_image"]
    assert stored.tobytes() == make_sample(3, seed=0, resolution=32)["conditioning_image"].tobytes()
    other = recipe(given, condition={"type": "canny", "low_threshold": 1, "high_threshold": 2})
    assert build(other)["cached"] is True


def test_failure_midway_leaves_the_old_dataset_intact(recipe, build, folder, monkeypatch):
    old = build(recipe(SHAPES))
    from recipe_runner.conditions.simple import Canny

    calls = {"n": 0}

    def broken(self, image):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("annotator crashed")
        return image

    monkeypatch.setattr(Canny, "__call__", broken)
    with pytest.raises(RuntimeError, match="annotator crashed"):
        build(recipe(SHAPES, condition={"type": "canny", "low_threshold": 10, "high_threshold": 20}))
    report = json.loads((folder.dataset / "report.json").read_text())
    assert report["cache_key"] == old["cache_key"]
    assert [p.name for p in folder.root.iterdir()] == ["dataset"]  # no temporaries left


def test_failure_on_first_build_leaves_no_dataset_folder(recipe, folder, monkeypatch):
    from recipe_runner.conditions.simple import Canny

    monkeypatch.setattr(Canny, "__call__", lambda self, image: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_dataset(recipe(SHAPES), folder)
    assert not folder.dataset.exists()
    assert list(folder.root.iterdir()) == []


def test_holdout_comes_out_of_max_samples(recipe, build):
    # 3 rows survive max_samples; holdout 2 < max_samples passes validation but leaves 1 training row.
    report = build(recipe({**SHAPES, "max_samples": 3, "holdout": 2}))
    assert report["rows_out"] == {"train": 1, "holdout": 2}


def test_console_progress_and_summary(recipe, folder):
    from rich.console import Console

    console = Console(record=True, width=200, force_terminal=False)
    build_dataset(recipe(SHAPES), folder, console=console)
    text = console.export_text()
    assert "24 train rows" in text and "rows/s" in text
    build_dataset(recipe(SHAPES), folder, console=console)
    assert "unchanged" in console.export_text()


def test_quiet_without_console(recipe, folder, capsys):
    build_dataset(recipe(SHAPES), folder)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_user_error_when_holdout_eats_every_row(recipe, build, tmp_path, images):
    images("pics", 3)
    (tmp_path / "pics" / "002.png").write_bytes(b"not a png")
    loaded = recipe({"source": {"path": "pics"}, "prompt": "x", "holdout": 2})
    with pytest.raises(UserError, match=r"only 2 rows left after filtering, but dataset.holdout is 2"):
        build(loaded)
