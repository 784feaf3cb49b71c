"""Every kind of source builds: image folders, parquet/jsonl/csv/arrow files and folders, and the hub's
offline error."""

from __future__ import annotations

import csv
import json

import datasets
import pytest

from recipe_runner.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_image_folder_with_metadata_jsonl(recipe, build, built, tmp_path, images):
    names = images("faces", 5)
    _jsonl(
        tmp_path / "faces" / "metadata.jsonl",
        [{"file_name": n, "text": f"face {i}"} for i, n in enumerate(names)],
    )
    report = build(recipe({"source": {"path": "faces"}, "columns": {"prompt": "text"}, "shuffle": False}))
    train = built()["train"]
    assert train["prompt"][:] == [f"face {i}" for i in range(5)]
    assert train[0]["image"].size == (32, 32)
    assert report["rows_out"] == {"train": 5} and "faces" in report["source"]


def test_image_folder_with_metadata_csv_and_subfolders(recipe, build, built, tmp_path, images):
    images("pets/cats", 2)
    with open(tmp_path / "pets" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows([["cats/000.png", "a cat"], ["cats/001.png", "another cat"]])
    build(recipe({"source": {"path": "pets"}, "columns": {"prompt": "caption"}, "shuffle": False}))
    assert built()["train"]["prompt"][:] == ["a cat", "another cat"]


def test_image_folder_without_metadata_uses_a_constant_prompt_and_folder_labels(recipe, build, built, images):
    images("animals/cat", 2)
    images("animals/dog", 3)
    build(recipe({"source": {"path": "animals"}, "prompt": "a photo of a {label}", "shuffle": False}))
    assert built()["train"]["prompt"][:] == ["a photo of a cat"] * 2 + ["a photo of a dog"] * 3


def test_image_folder_with_sidecar_captions_trains_on_them(recipe, build, built, tmp_path, images, folder):
    """NAME.txt or NAME.caption beside NAME.png (kohya sd-scripts' layout) is the prompt, with no
    column to set; an image without one gets an empty prompt, and the report says how many; an edited
    caption rebuilds the dataset."""
    from recipe_runner.data.cache_key import dataset_status

    images("tagged", 3)
    (tmp_path / "tagged" / "000.txt").write_text("  a red circle, flat\n", encoding="utf-8")
    (tmp_path / "tagged" / "001.caption").write_bytes(b"a blue \xff square")
    loaded = recipe({"source": {"path": "tagged"}, "shuffle": False})
    report = build(loaded)
    prompts = built()["train"]["prompt"][:]
    assert prompts == ["a red circle, flat", "a blue \ufffd square", ""]
    assert "captions from 2 of 3 .txt/.caption files; 1 image without one: empty prompt)" in report["source"]
    assert "prompt had invalid UTF-8 (replaced)" in report["warnings"]
    (tmp_path / "tagged" / "000.txt").write_text("a red circle, outlined", encoding="utf-8")
    assert not dataset_status(loaded, folder)[0]


def test_image_folder_with_conditioning_dir(recipe, build, built, tmp_path, images, make_photo):
    names = images("photos", 3)
    (tmp_path / "edges").mkdir()
    for i, n in enumerate(names):
        make_photo(48, 40, seed=100 + i).save(tmp_path / "edges" / n)
    _jsonl(tmp_path / "photos" / "metadata.jsonl", [{"file_name": n, "prompt": n} for n in names])
    loaded = recipe({"source": {"path": "photos", "conditioning_dir": "edges"}, "shuffle": False})
    report = build(loaded)
    row = built()["train"][1]
    expected = make_photo(48, 40, seed=101).resize((32, 32), box=(4, 0, 44, 40), resample=2)  # bilinear
    assert row["conditioning_image"].tobytes() == expected.tobytes()
    assert report["columns"]["conditioning_image"] == "conditioning_image"
    assert report["key_inputs"]["condition"] is None  # given, not computed


def test_missing_file_in_conditioning_dir_is_named(recipe, build, tmp_path, images):
    names = images("photos", 3)
    images("edges", 2)
    _jsonl(tmp_path / "photos" / "metadata.jsonl", [{"file_name": n, "prompt": "p"} for n in names])
    report = build(recipe({"source": {"path": "photos", "conditioning_dir": "edges"}}))
    drop = report["dropped"]["conditioning_image: missing file"]
    assert drop["count"] == 1 and drop["examples"][0]["file"].endswith("edges/002.png")
    with pytest.raises(UserError, match=r"row 2 \(.*edges/002.png\): conditioning_image: missing file"):
        build(
            recipe(
                {
                    "source": {"path": "photos", "conditioning_dir": "edges"},
                    "filters": {"on_bad_image": "error"},
                }
            )
        )


def test_parquet_of_paths_relative_to_the_parquet_file(recipe, build, built, tmp_path, images):
    names = images("data/img", 4)
    images("data/cond", 4)
    ds = datasets.Dataset.from_dict(
        {"img": [f"img/{n}" for n in names], "cond": [f"cond/{n}" for n in names], "text": list("abcd")}
    )
    ds.to_parquet(str(tmp_path / "data" / "train.parquet"))
    loaded = recipe(
        {
            "source": {"path": "data/train.parquet"},
            "shuffle": False,
            "columns": {"image": "img", "conditioning_image": "cond", "prompt": "text"},
        }
    )
    report = build(loaded)
    assert built()["train"]["prompt"][:] == list("abcd")
    assert report["rows_out"] == {"train": 4}


def test_parquet_with_embedded_images_and_a_folder_of_shards(recipe, build, built, tmp_path, make_photo):
    feats = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        rows = {
            "image": [make_photo(40, 40, seed=shard * 10 + i) for i in range(3)],
            "prompt": [f"s{shard}"] * 3,
        }
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(
            str(tmp_path / "shards" / f"{shard}.parquet")
        )
    build(recipe({"source": {"path": "shards"}, "shuffle": False}))
    assert built()["train"]["prompt"][:] == ["s0"] * 3 + ["s1"] * 3


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_jsonl_and_csv_files(recipe, build, built, tmp_path, images, fmt):
    names = images("pics", 3)
    rows = [{"path": f"pics/{n}", "caption": f"c{i}", "n": i} for i, n in enumerate(names)]
    if fmt == "jsonl":
        _jsonl(tmp_path / "rows.jsonl", rows)
    else:
        with open(tmp_path / "rows.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "caption", "n"])
            w.writeheader()
            w.writerows(rows)
    build(
        recipe(
            {
                "source": {"path": f"rows.{fmt}"},
                "columns": {"image": "path"},
                "prompt": "{caption} #{n:02d}",
                "shuffle": False,
            }
        )
    )
    assert built()["train"]["prompt"][:] == ["c0 #00", "c1 #01", "c2 #02"]


def test_saved_arrow_dataset_folder(recipe, build, built, tmp_path, make_photo):
    ds = datasets.Dataset.from_dict(
        {"image": [make_photo(32, 48, seed=i) for i in range(3)], "prompt": list("xyz")},
        features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    build(recipe({"source": {"path": "saved"}, "shuffle": False}))
    assert built()["train"]["prompt"][:] == list("xyz")


def test_arrow_file(recipe, build, built, tmp_path, make_photo):
    ds = datasets.Dataset.from_dict(
        {"image": [make_photo(40, 32, seed=i) for i in range(2)], "prompt": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    arrow.rename(tmp_path / "rows.arrow")
    build(recipe({"source": {"path": "rows.arrow"}, "shuffle": False}))
    assert built()["train"]["prompt"][:] == ["a", "b"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: (p / "empty").mkdir(), "no images or data files"),
        (lambda p: (p / "empty").write_text(""), "cannot tell the format"),
        (lambda p: (p / "empty.jsonl").write_text(""), "is empty"),
        (lambda p: (p / "empty.csv").write_text("file_name,prompt\n"), "has no rows"),
    ],
)
def test_empty_sources_are_user_errors(recipe, build, tmp_path, folder, make, words):
    make(tmp_path)
    name = next(p.name for p in tmp_path.iterdir() if p.name.startswith("empty"))
    with pytest.raises(UserError, match=words):
        build(recipe({"source": {"path": name}, "prompt": "p"}))
    assert not folder.dataset.exists()


def test_a_folder_mixing_data_formats_is_a_user_error(recipe, build, tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("image,prompt\nx.png,p\n")
    _jsonl(tmp_path / "mixed" / "b.jsonl", [{"image": "x.png", "prompt": "p"}])
    with pytest.raises(UserError, match="csv and jsonl"):
        build(recipe({"source": {"path": "mixed"}}))
    with pytest.raises(
        UserError, match=r"all 1 rows were dropped \(image: missing file: 1 \(e.g. row 0 x.png\)\)"
    ):
        build(recipe({"source": {"path": "mixed", "format": "csv"}}))


def test_metadata_without_file_name_lists_its_columns(recipe, build, tmp_path, images):
    images("pics", 1)
    _jsonl(tmp_path / "pics" / "metadata.jsonl", [{"file": "000.png", "prompt": "p"}])
    with pytest.raises(UserError, match=r"no file_name column \(columns: file, prompt\)"):
        build(recipe({"source": {"path": "pics"}}))


def test_unreachable_hub_dataset_suggests_a_local_copy(recipe, build, folder, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be reached") as e:
        build(recipe({"source": {"hub": "someone/not-downloaded"}}))
    assert "path:" in e.value.hint and "offline" in e.value.hint
    assert not folder.dataset.exists()


def test_local_builds_write_nothing_to_the_huggingface_cache(recipe, build, tmp_path, images, monkeypatch):
    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    names = images("pics", 2)
    _jsonl(tmp_path / "rows.jsonl", [{"image": f"pics/{n}", "prompt": "p"} for n in names])
    build(recipe({"source": {"path": "rows.jsonl"}, "num_proc": 2}))
    build(recipe({"source": {"builtin": "shapes", "num_samples": 4}}))
    assert not hf_cache.exists()
    assert sorted(p.name for p in (tmp_path / "run" / "dataset").iterdir()) == [
        ".complete",
        "data",
        "preview.png",
        "report.json",
    ]
