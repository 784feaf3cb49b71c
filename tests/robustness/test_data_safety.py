"""A run touches only its own folder: never the user's data, recipes, models or unrelated files.

Each test sets up what a user has on disk, runs the CLI as they would, and checks the exit code and
that every byte of the user's files is as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SMALL_BUILD = """\
name: safe
dataset:
  source: {builtin: shapes, num_samples: 8}
  resolution: 32
model: {base: builtin:tiny-sd}
"""


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (dotfiles too) and the sha256 of its bytes."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            found[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def image_folder(root: Path, n: int = 6, *, conditioning: Path | None = None) -> None:
    """An image folder with metadata.jsonl (and conditioning images of the same names)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name)
        if conditioning is not None:
            conditioning.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(conditioning / name)
        rows.append(json.dumps({"file_name": name, "text": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project folder: their own dataset/ and README.md, with the recipe beside them."""
    proj = tmp_path / "proj"
    image_folder(proj / "dataset")
    (proj / "README.md").write_text("# my project\n")
    monkeypatch.chdir(proj)
    return proj


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


OVERLAP = """\
name: mine
dataset:
  source: {path: dataset}
  columns: {prompt: text}
  resolution: 32
model: {base: builtin:tiny-sd}
train: {max_steps: 2, batch_size: 2}
output:
  dir: .
"""


@pytest.mark.parametrize("command", ["validate", "plan", "build-dataset", "run"])
def test_run_folder_holding_the_data_is_refused_everywhere(cli, project, command):
    recipe = write(project / "recipe.yaml", OVERLAP)
    before = snapshot(project)
    r = cli(command, recipe)
    assert r.exit_code == 2, r.output
    assert "recipe.yaml:9:" in r.stderr  # output.dir's line
    assert str(project / "dataset") in r.stderr and "holds dataset.source.path" in r.stderr
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("source", "output", "what"),
    [
        ("{path: data}", "data/runs/x", "is inside dataset.source.path"),  # the run inside the data
        ("{path: data, conditioning_dir: cond}", "cond", "is dataset.source.conditioning_dir"),
        ("{builtin: shapes, num_samples: 8}", "models", "holds model.controlnet"),  # fine-tuned in place
        ("{builtin: shapes, num_samples: 8}", "..", "holds the recipe"),  # the recipe itself
        ("{builtin: shapes, num_samples: 8}", "val", "holds a validation image"),
    ],
)
def test_run_folder_overlapping_any_input_is_refused(cli, tmp_path, monkeypatch, source, output, what):
    proj = tmp_path / "p" / "q"
    image_folder(proj / "data", conditioning=proj / "cond")
    (proj / "models" / "cn").mkdir(parents=True)
    (proj / "models" / "cn" / "config.json").write_text("{}")
    (proj / "val").mkdir()
    Image.new("RGB", (32, 32)).save(proj / "val" / "edge.png")
    recipe = write(
        proj / "r.yaml",
        f"name: x\ndataset:\n  source: {source}\n  columns: {{prompt: text}}\n  resolution: 32\n"
        "model: {base: builtin:tiny-sd, controlnet: ./models/cn}\n"
        "train:\n  validation: {conditioning_images: [val/edge.png], prompts: [a]}\n",
    )
    monkeypatch.chdir(proj)
    before = snapshot(tmp_path)
    r = cli("build-dataset", recipe, "-o", output)
    assert r.exit_code == 2, r.output
    assert what in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


def test_output_dir_that_is_not_a_run_folder_is_refused(cli, write_recipe, tmp_path):
    recipe = write_recipe(SMALL_BUILD)
    theirs = tmp_path / "theirs"
    write(theirs / "README.md", "their readme\n")
    write(theirs / "dataset" / "notes.txt", "their notes\n")
    write(theirs / "checkpoints" / "step-1" / "weights.bin", "their weights\n")
    write(theirs / ".README.md.abc.tmp", "a dotfile that looks like our temporaries\n")
    before = snapshot(theirs)
    r = cli("build-dataset", recipe, "--output-dir", theirs)
    assert r.exit_code == 2, r.output
    assert "already holds files that no run wrote" in r.stderr
    assert "README.md" in r.stderr and "checkpoints/" in r.stderr
    assert snapshot(theirs) == before


def test_empty_folder_and_run_folder_are_accepted(cli, write_recipe, tmp_path):
    recipe = write_recipe(SMALL_BUILD)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("build-dataset", recipe, "-o", empty).exit_code == 0
    assert (empty / "dataset" / "report.json").is_file()
    again = cli("build-dataset", recipe, "-o", empty)  # now a run folder: reused
    assert again.exit_code == 0, again.output
    assert "unchanged" in again.output


def test_empty_output_dir_is_an_error(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(SMALL_BUILD)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    r = cli("build-dataset", recipe, "--output-dir", "")
    assert r.exit_code == 2, r.output
    assert "--output-dir is empty" in r.stderr
    assert snapshot(tmp_path) == before
    r = cli("validate", write_recipe(SMALL_BUILD + "output: {dir: ''}\n", "empty.yaml"))
    assert r.exit_code == 2 and "output.dir" in r.stderr


def test_tilde_is_expanded_once_for_every_path(cli, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    image_folder(home / "pictures")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work.mkdir() or work)
    recipe = write(
        home / "recipes" / "r.yaml",
        "name: t\ndataset:\n  source: {path: ~/pictures}\n  columns: {prompt: text}\n  resolution: 32\n"
        "model: {base: builtin:tiny-sd}\noutput: {dir: ~/runs/t}\n",
    )
    r = cli("build-dataset", recipe)
    assert r.exit_code == 0, r.output
    run = home / "runs" / "t"
    assert (run / "dataset" / "data" / "dataset_dict.json").is_file()
    assert not (work / "~").exists() and not (home / "recipes" / "~").exists()
    again = cli("build-dataset", recipe)
    assert again.exit_code == 0 and "unchanged" in again.output, again.output


def test_tilde_in_extends_is_expanded(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "presets" / "small.yaml", "dataset: {resolution: 32}\n")
    recipe = write(
        tmp_path / "x" / "r.yaml",
        "extends: ~/presets/small.yaml\n" + SMALL_BUILD.replace("  resolution: 32\n", ""),
    )
    r = cli("show", recipe)
    assert r.exit_code == 0, r.output
    assert "resolution: 32" in r.stdout


def test_a_dataset_missing_its_data_is_not_complete(cli, write_recipe, tmp_path):
    import shutil

    recipe = write_recipe(SMALL_BUILD)
    out = tmp_path / "run"
    assert cli("build-dataset", recipe, "-o", out).exit_code == 0
    shutil.rmtree(out / "dataset" / "data")  # e.g. written elsewhere, or deleted by hand
    r = cli("build-dataset", recipe, "-o", out)
    assert r.exit_code == 0, r.output
    assert "incomplete" in r.output
    assert (out / "dataset" / "data" / "dataset_dict.json").is_file()


@pytest.mark.parametrize("how", ["absolute", "relative", "from-inside"])
def test_conditioning_dir_resolves_however_the_recipe_is_named(cli, tmp_path, monkeypatch, how):
    proj = tmp_path / "proj"
    image_folder(proj / "data", conditioning=proj / "cond")
    recipe = write(
        proj / "r.yaml",
        "name: c\ndataset:\n  source: {path: data, conditioning_dir: cond}\n  columns: {prompt: text}\n"
        "  resolution: 32\nmodel: {base: builtin:tiny-sd}\n",
    )
    given = {"absolute": recipe, "relative": Path("proj/r.yaml"), "from-inside": Path("r.yaml")}[how]
    monkeypatch.chdir(proj if how == "from-inside" else tmp_path)
    out = tmp_path / "out"
    r = cli("build-dataset", given, "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "dataset" / "report.json").read_text())
    assert report["rows_out"]["train"] == 6, report
    assert not report.get("dropped"), report.get("dropped")


def test_an_invalid_input_found_before_the_stages_writes_nothing(cli, tmp_path, monkeypatch):
    (tmp_path / "mybase").mkdir()  # exists, so validate passes; not a diffusers model: found before any stage
    recipe = write(tmp_path / "r.yaml", SMALL_BUILD.replace("builtin:tiny-sd", "./mybase"))
    monkeypatch.chdir(tmp_path)
    r = cli("train", recipe, "-o", "runs/x")
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "runs").exists()


def test_reproduce_a_lock_in_the_current_folder(tmp_path, monkeypatch):
    """`recipe reproduce run.lock.json` from inside the run folder reruns into its `-reproduce` sibling."""
    from recipe_runner.run import pipeline, reproduce

    run = tmp_path / "demo"
    run.mkdir()
    lock = {"format": 1, "recipe": {"name": "x"}, "recipe_dir": str(tmp_path), "packages": {}}
    (run / "run.lock.json").write_text(json.dumps(lock))
    monkeypatch.chdir(run)
    seen: dict = {}

    def run_recipe(loaded, output_dir, quiet):
        seen["to"] = output_dir
        return {}

    monkeypatch.setattr(reproduce, "load_resolved", lambda data, base: data)
    monkeypatch.setattr(pipeline, "run_recipe", run_recipe)
    reproduce.reproduce_lock(Path("run.lock.json"), quiet=True)
    assert seen["to"] == tmp_path / "demo-reproduce"
