"""`recipe validate` checks the columns a recipe names against a local source's header (exit 2 at the
field, with the columns that exist and a did-you-mean), and never rejects a recipe the build accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recipe_runner.data.columns import check_columns
from recipe_runner.recipe.loader import load_recipe

ROWS = [{"picture": f"img/{i}.png", "text": f"prompt {i}", "kind": "a"} for i in range(2)]


def _recipe(dataset: str) -> str:
    return f"name: t\ndataset:\n{dataset}  resolution: 32\nmodel:\n  base: builtin:tiny-sd\n"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = list(rows[0])
    path.write_text(",".join(head) + "\n" + "".join(",".join(r[k] for k in head) + "\n" for r in rows))


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({k: [r[k] for r in rows] for k in rows[0]})


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(rows), path)


def _arrow(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _table(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _saved(path: Path, rows: list[dict], splits: tuple[str, ...] = ()) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(path))


def _images(root: Path, names: list[str], captions: bool = False) -> None:
    for name in names:
        _png(root / name)
        if captions:
            (root / name).with_suffix(".txt").write_text(f"caption of {name}")


# (id, make the source under tmp_path, the recipe's dataset section with {} for the column mapping,
#  a good mapping, a misspelt one, the misspelt field, the expected message, the hint)
FORMATS: list[tuple[str, Callable[[Path], None], str, str, str, str, str, str]] = [
    (
        "jsonl",
        lambda t: _jsonl(t / "data" / "x.jsonl", ROWS),
        "  source: {{path: data/x.jsonl}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: pictur, prompt: text}",
        "image",
        "no column 'pictur' in jsonl file data/x.jsonl (columns: picture, text, kind)",
        "did you mean 'picture'?",
    ),
    (
        "csv",
        lambda t: _csv(t / "data" / "x.csv", ROWS),
        "  source: {{path: data/x.csv}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: picture, prompt: txt}",
        "prompt",
        "no column 'txt' in csv file data/x.csv (columns: picture, text, kind)",
        "did you mean 'text'?",
    ),
    (
        "parquet",
        lambda t: _parquet(t / "data" / "x.parquet", ROWS),
        "  source: {{path: data/x.parquet}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: picture, prompt: texts}",
        "prompt",
        "no column 'texts' in parquet file data/x.parquet (columns: picture, text, kind)",
        "did you mean 'text'?",
    ),
    (
        "arrow-file",
        lambda t: _arrow(t / "data" / "x.arrow", ROWS),
        "  source: {{path: data/x.arrow}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: pictures, prompt: text}",
        "image",
        "no column 'pictures' in arrow file data/x.arrow (columns: picture, text, kind)",
        "did you mean 'picture'?",
    ),
    (
        "save_to_disk",
        lambda t: _saved(t / "data" / "saved", ROWS),
        "  source: {{path: data/saved}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: picture, prompt: tex}",
        "prompt",
        "no column 'tex' in saved dataset data/saved (columns: picture, text, kind)",
        "did you mean 'text'?",
    ),
    (
        "save_to_disk-dict",
        lambda t: _saved(t / "data" / "saved", ROWS, splits=("train", "test")),
        "  source: {{path: data/saved}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: picture, prompt: tex}",
        "prompt",
        "no column 'tex' in saved dataset data/saved (columns: picture, text, kind)",
        "did you mean 'text'?",
    ),
    (
        "jsonl-folder",
        lambda t: (_jsonl(t / "data" / "a" / "x.jsonl", ROWS), _jsonl(t / "data" / "b" / "y.jsonl", ROWS)),
        "  source: {{path: data}}\n  columns: {}\n",
        "{image: picture, prompt: text}",
        "{image: picture, prompt: test}",
        "prompt",
        "no column 'test' in 2 jsonl file(s) in data (columns: picture, text, kind)",
        "did you mean 'text'?",
    ),
    (
        "imagefolder-metadata",
        lambda t: (
            _images(t / "faces", ["0.png", "1.png"]),
            _jsonl(t / "faces" / "metadata.jsonl", [{"file_name": "0.png", "caption": "c"}]),
        ),
        "  source: {{path: faces}}\n  columns: {}\n",
        "{prompt: caption}",
        "{prompt: captoin}",
        "prompt",
        "no column 'captoin' in image folder faces (metadata.jsonl) (columns: image, caption)",
        "did you mean 'caption'?",
    ),
    (
        "imagefolder-metadata-csv",
        lambda t: (
            _images(t / "faces", ["0.png"]),
            (t / "faces" / "metadata.csv").write_text("file_name,caption\n0.png,c\n"),
        ),
        "  source: {{path: faces}}\n  columns: {}\n",
        "{prompt: caption}",
        "{image: file_name, prompt: caption}",
        "image",
        "no column 'file_name' in image folder faces (metadata.csv) (columns: image, caption)",
        "an image folder's metadata `file_name` column becomes the `image` column",
    ),
    (
        "imagefolder-captions",
        lambda t: _images(t / "tagged", ["0.png", "1.png"], captions=True),
        "  source: {{path: tagged}}\n  columns: {}\n",
        "{prompt: prompt}",
        "{prompt: promt}",
        "prompt",
        "no column 'promt' in image folder tagged (columns: image, prompt)",
        "did you mean 'prompt'?",
    ),
]


@pytest.mark.parametrize(
    ("make", "dataset", "good", "bad", "field", "message", "hint"),
    [f[1:] for f in FORMATS],
    ids=[f[0] for f in FORMATS],
)
def test_misspelt_column_is_located_with_the_columns_and_a_did_you_mean(
    cli, write_recipe, tmp_path, make, dataset, good, bad, field, message, hint
):
    make(tmp_path)
    ok = cli("validate", write_recipe(_recipe(dataset.format(good))))
    assert ok.exit_code == 0, ok.output
    result = cli("validate", write_recipe(_recipe(dataset.format(bad))), "--json")
    assert result.exit_code == 2, result.output
    [problem] = json.loads(result.stdout)["files"][0]["problems"]
    assert problem["path"] == f"dataset.columns.{field}"
    assert (problem["line"], problem["message"], problem["hint"]) == (4, message, hint)
    text = cli("validate", write_recipe(_recipe(dataset.format(bad))))
    assert f"recipe.yaml:4:{problem['column']}: error: dataset.columns.{field}: {message}" in text.stderr
    assert "Traceback" not in text.output


def test_block_style_points_at_the_field_and_plan_refuses_too(cli, write_recipe, tmp_path):
    _jsonl(tmp_path / "data" / "x.jsonl", ROWS)
    recipe = write_recipe(
        _recipe("  source: {path: data/x.jsonl}\n  columns:\n    image: picture\n    prompt: txt\n")
    )
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "recipe.yaml:6:5: error: dataset.columns.prompt: no column 'txt'" in result.stderr
    assert "did you mean 'text'?" in result.stderr
    assert cli("plan", recipe, "-o", tmp_path / "run").exit_code == 2
    assert not (tmp_path / "run").exists()


def test_prompt_template_placeholders_are_checked(cli, write_recipe, tmp_path):
    _images(tmp_path / "animals" / "cat", ["0.png"])
    _images(tmp_path / "animals" / "dog", ["0.png"])
    good = write_recipe(_recipe("  source: {path: animals}\n  prompt: 'a photo of a {label}'\n"))
    assert cli("validate", good).exit_code == 0
    bad = write_recipe(_recipe("  source: {path: animals}\n  prompt: 'a {lable} on {label}'\n"))
    result = cli("validate", bad, "--json")
    assert result.exit_code == 2
    [problem] = json.loads(result.stdout)["files"][0]["problems"]
    assert problem["path"] == "dataset.prompt" and problem["line"] == 4
    assert (
        problem["message"]
        == "placeholder {lable}: no column 'lable' in image folder animals (columns: image, label)"
    )
    assert problem["hint"] == "did you mean 'label'?"


def test_builtin_columns_are_checked(cli, write_recipe):
    good = write_recipe(
        _recipe("  source: {builtin: shapes, num_samples: 8}\n  prompt: 'a {color} {shape}'\n")
    )
    assert cli("validate", good).exit_code == 0
    bad = write_recipe(
        _recipe("  source: {builtin: shapes, num_samples: 8}\n  prompt: 'a {colour} {shape}'\n")
    )
    result = cli("validate", bad)
    assert result.exit_code == 2
    assert "dataset.prompt: placeholder {colour}: no column 'colour' in builtin shapes" in result.stderr
    assert "did you mean 'color'?" in result.stderr


@pytest.mark.parametrize(
    ("name", "make", "dataset"),
    [
        # A key of a later row only: datasets' json loader has it as a column.
        (
            "jsonl-late-key",
            lambda t: _jsonl(t / "x.jsonl", [{"image": "a.png"}, {"image": "b.png", "text": "t"}]),
            "  source: {path: x.jsonl}\n  columns: {prompt: text}\n",
        ),
        # Sub-folders are loaded apart and concatenated: the union of their columns.
        (
            "folders-union",
            lambda t: (
                _jsonl(t / "d" / "a" / "x.jsonl", [{"image": "a.png", "p": "1"}]),
                _jsonl(t / "d" / "b" / "y.jsonl", [{"image": "a.png", "q": "1"}]),
            ),
            "  source: {path: d}\n  columns: {prompt: q}\n",
        ),
        # conditioning_dir adds the conditioning column under the recipe's name for it.
        (
            "conditioning-dir",
            lambda t: (_images(t / "photos", ["0.png"], captions=True), _images(t / "edges", ["0.png"])),
            "  source: {path: photos, conditioning_dir: edges}\n"
            "  columns: {conditioning_image: edge_map, prompt: prompt}\n",
        ),
        # A csv whose header pandas renames ("Unnamed: 1", "a.1"): not second-guessed.
        (
            "csv-renamed-header",
            lambda t: (t / "x.csv").write_text("image,,image\na.png,b,c\n"),
            "  source: {path: x.csv}\n  columns: {prompt: 'image.1'}\n",
        ),
        # A JSON array, not lines: told only by loading it.
        (
            "json-array",
            lambda t: (t / "x.json").write_text(json.dumps([{"image": "a.png", "text": "t"}])),
            "  source: {path: x.json}\n  columns: {prompt: text}\n",
        ),
        # A hub dataset's columns are known only by downloading it.
        ("hub", lambda t: None, "  source: {hub: fusing/fill50k}\n  columns: {prompt: txt}\n"),
    ],
    ids=lambda v: v if isinstance(v, str) and "\n" not in v else "",
)
def test_what_the_build_may_accept_stays_valid(cli, write_recipe, tmp_path, name, make, dataset):
    make(tmp_path)
    result = cli("validate", write_recipe(_recipe(dataset)))
    assert result.exit_code == 0, result.output


def _build_rejects(loaded, work: Path) -> str | None:
    """The build's own column check (`row_plan` on the loaded source): its message, or None."""
    from recipe_runner.data.process import row_plan
    from recipe_runner.data.sources import load_source
    from recipe_runner.errors import UserError

    try:
        row_plan(loaded, load_source(loaded, work))
    except UserError as e:
        return e.message
    return None


AGREEMENT = [
    ("jsonl", lambda t: _jsonl(t / "x.jsonl", ROWS), "{path: x.jsonl}"),
    (
        "jsonl-late-key",
        lambda t: _jsonl(t / "x.jsonl", [{"picture": "a"}, {"picture": "b", "text": "t"}]),
        "{path: x.jsonl}",
    ),
    ("csv", lambda t: _csv(t / "x.csv", ROWS), "{path: x.csv}"),
    ("parquet", lambda t: _parquet(t / "x.parquet", ROWS), "{path: x.parquet}"),
    ("arrow", lambda t: _arrow(t / "x.arrow", ROWS), "{path: x.arrow}"),
    ("saved", lambda t: _saved(t / "saved", ROWS), "{path: saved}"),
    ("saved-dict", lambda t: _saved(t / "saved", ROWS, splits=("validation",)), "{path: saved}"),
    (
        "folders",
        lambda t: (_parquet(t / "d" / "a" / "x.parquet", ROWS), _parquet(t / "d" / "b" / "y.parquet", ROWS)),
        "{path: d}",
    ),
    (
        "imagefolder-metadata",
        lambda t: (
            _images(t / "f", ["0.png"]),
            _jsonl(t / "f" / "metadata.jsonl", [{"file_name": "0.png", "text": "c", "kind": "k"}]),
        ),
        "{path: f}",
    ),
    ("imagefolder-labels", lambda t: _images(t / "f", ["cat/0.png", "dog/0.png"]), "{path: f}"),
    ("imagefolder-captions", lambda t: _images(t / "f", ["0.png"], captions=True), "{path: f}"),
    ("imagefolder-plain", lambda t: _images(t / "f", ["0.png"]), "{path: f}"),
    (
        "imagefolder-conditioning",
        lambda t: (_images(t / "f", ["0.png"]), _images(t / "c", ["0.png"])),
        "{path: f, conditioning_dir: c}",
    ),
]
MAPPINGS = [
    "  columns: {image: picture, prompt: text}\n",
    "  columns: {image: image, prompt: prompt}\n",
    "  columns: {image: image, prompt: text}\n",
    "  columns: {image: image, conditioning_image: conditioning_image, prompt: text}\n",
    "  columns: {image: file_name, prompt: text}\n",
    "  columns: {image: image, prompt: null}\n  prompt: 'a {label}'\n",
    "  columns: {image: image, prompt: null}\n  prompt: 'a {kind} {text}'\n",
    "  columns: {image: picture, conditioning_image: kind, prompt: text}\n",
    "  columns: {image: picture, prompt: null}\n  prompt: 'a {kind}'\n",
    "  columns: {image: picture, prompt: null}\n  prompt: 'a {kind} {txt}'\n",
    "  columns: {image: image, prompt: null}\n  prompt: 'a photo'\n",
    "  columns: {image: image, conditioning_image: conditioning_image, prompt: null}\n  prompt: 'a photo'\n",
]


@pytest.mark.parametrize(("make", "source"), [a[1:] for a in AGREEMENT], ids=[a[0] for a in AGREEMENT])
def test_validate_rejects_exactly_what_the_build_rejects(tmp_path, make, source):
    """Each mapping against each kind of source: validate finds a missing column iff the build does."""
    make(tmp_path)
    outcomes = set()
    for i, mapping in enumerate(MAPPINGS):
        path = tmp_path / f"recipe{i}.yaml"
        path.write_text(_recipe(f"  source: {source}\n{mapping}"), encoding="utf-8")
        loaded = load_recipe(path)
        problems = check_columns(loaded)
        build = _build_rejects(loaded, tmp_path / f"work{i}")
        assert bool(problems) == (build is not None), (mapping, [p.message for p in problems], build)
        outcomes.add(build is None)
    assert outcomes == {True, False}  # each source has mappings the build accepts and ones it rejects


def test_unreadable_headers_are_left_to_the_build(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe("  source: {path: x.parquet}\n  columns: {prompt: nope}\n"), encoding="utf-8")
    assert check_columns(load_recipe(path)) == []


def test_validate_of_local_data_imports_no_torch_nor_datasets(tmp_path):
    _parquet(tmp_path / "x.parquet", ROWS)
    _jsonl(tmp_path / "x.jsonl", ROWS)
    for i, name in enumerate(("x.parquet", "x.jsonl")):
        (tmp_path / f"r{i}.yaml").write_text(
            _recipe(f"  source: {{path: {name}}}\n  columns: {{image: picture, prompt: txt}}\n")
        )
    code = (
        "import sys\nfrom recipe_runner.cli import app\n"
        f"try:\n    app(['validate', {str(tmp_path / 'r0.yaml')!r}, {str(tmp_path / 'r1.yaml')!r}])\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'datasets', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("did you mean 'text'?") == 2


def test_a_folder_too_large_to_walk_is_left_to_the_build(tmp_path, monkeypatch):
    from recipe_runner.data import columns

    _images(tmp_path / "many", ["0.png", "1.png", "2.png"])
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe("  source: {path: many}\n  columns: {prompt: nope}\n"), encoding="utf-8")
    assert [p.path for p in check_columns(load_recipe(path))] == ["dataset.columns.prompt"]
    monkeypatch.setattr(columns, "_MAX_FILES", 2)
    assert check_columns(load_recipe(path)) == []
