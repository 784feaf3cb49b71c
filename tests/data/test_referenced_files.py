"""The dataset cache follows the files the data names by path (images beside a jsonl, absolute paths,
metadata entries outside an image folder): change, delete or restore one and the next build rebuilds,
and `recipe plan` says which file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipe_runner.data.build import dataset_status
from recipe_runner.recipe.loader import load_recipe

RECIPE = """\
name: refs
dataset:
  source: {path: data/rows.jsonl}
  columns: {prompt: text}
  resolution: 32
"""


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def project(tmp_path: Path, images, write_recipe) -> Path:
    """recipe.yaml reading data/rows.jsonl, whose rows name data/img/000.png..002.png as img/NNN.png."""
    names = images("data/img", 3)
    _jsonl(tmp_path / "data" / "rows.jsonl", [{"image": f"img/{n}", "text": f"p{n}"} for n in names])
    return write_recipe(RECIPE)


def _build(cli, recipe: Path, run: Path) -> str:
    result = cli("build-dataset", recipe, "-o", run)
    assert result.exit_code == 0, result.output
    return result.stderr


def _plan_reason(cli, recipe: Path, run: Path) -> tuple[str, str]:
    result = cli("plan", recipe, "-o", run, "--json")
    assert result.exit_code == 0, result.output
    dataset = json.loads(result.stdout)["stages"][0]
    return dataset["status"], dataset["reason"]


def test_replacing_an_image_the_jsonl_names_rebuilds_and_says_which(cli, project, tmp_path, make_photo):
    run = tmp_path / "run"
    assert "dataset: running (no dataset yet)" in _build(cli, project, run)
    report = json.loads((run / "dataset" / "report.json").read_text())
    assert report["referenced_files"]["count"] == 3
    recorded = json.loads((run / "dataset" / "referenced_files.json").read_text())["files"]
    assert [Path(f["path"]).relative_to(tmp_path).as_posix() for f in recorded] == [
        f"data/img/00{i}.png" for i in range(3)
    ]
    assert "✓ dataset: skipped (unchanged" in _build(cli, project, run)
    assert _plan_reason(cli, project, run)[0] == "cached"

    make_photo(64, 40, seed=99).save(tmp_path / "data" / "img" / "001.png")  # another picture and size
    why = "1 of 3 files the data refers to changed (e.g. data/img/001.png)"
    assert _plan_reason(cli, project, run) == ("would run", why)
    assert f"▶ dataset: running ({why})" in _build(cli, project, run)
    rebuilt = json.loads((run / "dataset" / "report.json").read_text())
    assert rebuilt["data_sha256"] != report["data_sha256"]
    assert "✓ dataset: skipped (unchanged" in _build(cli, project, run)


def test_new_content_rebuilds_and_a_touch_alone_does_not(cli, project, tmp_path, folder, make_photo):
    _build(cli, project, folder.root)
    image = tmp_path / "data" / "img" / "002.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes: keyed by content
    assert dataset_status(load_recipe(project), folder)[0] is True
    make_photo(48, 40, seed=7).save(image)
    cached, why = dataset_status(load_recipe(project), folder)
    assert not cached and why == "1 of 3 files the data refers to changed (e.g. data/img/002.png)"


def test_deleting_an_image_rebuilds_without_its_row_and_restoring_it_rebuilds_again(
    cli, project, tmp_path, make_photo
):
    run = tmp_path / "run"
    _build(cli, project, run)
    image = tmp_path / "data" / "img" / "000.png"
    image.unlink()
    why = "1 of 3 files the data refers to changed (e.g. data/img/000.png, now missing)"
    assert _plan_reason(cli, project, run) == ("would run", why)
    assert f"running ({why})" in _build(cli, project, run)
    report = json.loads((run / "dataset" / "report.json").read_text())
    assert report["rows_out"] == {"train": 2}
    assert report["dropped"]["image: missing file"]["examples"][0]["file"] == "img/000.png"
    assert _plan_reason(cli, project, run)[0] == "cached"  # still missing: the dataset is as it would be

    make_photo(48, 40).save(image)
    status, why = _plan_reason(cli, project, run)
    assert status == "would run" and why.endswith("(e.g. data/img/000.png, missing at the last build)")
    _build(cli, project, run)
    assert json.loads((run / "dataset" / "report.json").read_text())["rows_out"] == {"train": 3}


def test_parquet_of_absolute_paths_records_only_the_files_not_embedded(
    recipe, build, folder, tmp_path, images, make_photo
):
    import io

    images("elsewhere", 2)
    embedded = io.BytesIO()
    make_photo(40, 40, seed=5).save(embedded, format="PNG")
    elsewhere = [str(tmp_path / "elsewhere" / n) for n in ("000.png", "001.png")]
    column = pa.array(
        [{"bytes": embedded.getvalue(), "path": "inline.png"}]
        + [{"bytes": None, "path": p} for p in elsewhere],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"image": column, "text": ["a", "b", "c"]}), tmp_path / "data" / "rows.parquet")
    loaded = recipe({"source": {"path": "data/rows.parquet"}, "columns": {"prompt": "text"}})
    report = build(loaded)
    assert report["rows_out"] == {"train": 3} and report["referenced_files"]["count"] == 2
    assert dataset_status(loaded, folder)[0] is True

    make_photo(40, 40, seed=6).save(elsewhere[1])
    cached, why = dataset_status(loaded, folder)
    assert not cached and why.startswith("1 of 2 files the data refers to changed (e.g. ")
    assert why.endswith("elsewhere/001.png)")
    assert build(loaded)["cached"] is False


def test_image_folder_records_only_files_outside_the_folder(
    recipe, build, folder, tmp_path, images, make_photo
):
    names = images("faces", 2)
    images("extra", 1)
    rows = [{"file_name": n, "text": n} for n in names] + [{"file_name": "../extra/000.png", "text": "x"}]
    _jsonl(tmp_path / "faces" / "metadata.jsonl", rows)
    loaded = recipe({"source": {"path": "faces"}, "columns": {"prompt": "text"}})
    report = build(loaded)
    assert report["referenced_files"]["count"] == 1  # the folder's own files are in its fingerprint
    recorded = json.loads((folder.dataset / "referenced_files.json").read_text())["files"]
    assert [Path(f["path"]).name for f in recorded] == ["000.png"] and "extra" in recorded[0]["path"]
    make_photo(48, 40, seed=9).save(
        tmp_path / "extra" / "000.png"
    )  # new content (a touch alone keeps the cache)
    cached, why = dataset_status(loaded, folder)
    assert not cached and why == "1 of 1 files the data refers to changed (e.g. extra/000.png)"


def test_a_damaged_record_is_not_trusted(cli, project, folder):
    _build(cli, project, folder.root)
    loaded = load_recipe(project)
    assert dataset_status(loaded, folder)[0] is True
    (folder.dataset / "referenced_files.json").write_text('{"files": []}\n')
    cached, why = dataset_status(loaded, folder)
    assert not cached and "referenced_files.json" in why


def test_a_dataset_built_before_files_were_recorded_is_rebuilt_once(cli, project, folder):
    _build(cli, project, folder.root)
    path = folder.dataset / "report.json"
    report = json.loads(path.read_text())
    del report["referenced_files"]
    path.write_text(json.dumps(report))
    cached, why = dataset_status(load_recipe(project), folder)
    assert not cached and why == "built by a version that did not record the files the data refers to"
    _build(cli, project, folder.root)
    assert dataset_status(load_recipe(project), folder)[0] is True
