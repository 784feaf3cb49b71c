"""Moved hub ids (warned, still mapped), presets validated as partial recipes, `diff --git` of a new file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from recipe_runner.recipe.loader import load_recipe
from recipe_runner.recipe.model import DEFAULT_BASE, MOVED_HUB_IDS, ModelSpec, guess_family
from recipe_runner.run.estimates import estimate_memory

OLD, NEW = "runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"
RECIPE = "name: t\ndataset: {source: {hub: a/b}, resolution: 512}\nmodel:\n  base: %s\n"


def test_default_base_is_the_id_diffusers_moved_to():
    assert ModelSpec().base == NEW == DEFAULT_BASE
    assert MOVED_HUB_IDS[OLD] == NEW
    assert (
        MOVED_HUB_IDS["runwayml/stable-diffusion-inpainting"]
        == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    )
    assert not any(k.startswith("compvis/") for k in MOVED_HUB_IDS)  # CompVis' repositories are still up


@pytest.mark.parametrize("base", [NEW, OLD, "stable-diffusion-v1-5/stable-diffusion-inpainting"])
def test_new_and_old_ids_map_to_sd15(write_recipe, base):
    """The family picks the offline architecture (memory_trace.FAMILY_ARCHS) and the memory tables."""
    assert guess_family(base) == "sd1"
    new = load_recipe(write_recipe(RECIPE % NEW, "new.yaml")).recipe
    other = load_recipe(write_recipe(RECIPE % base, "other.yaml")).recipe
    assert other.model.resolved_family == "sd1"
    assert estimate_memory(other) == estimate_memory(new)


def test_validate_warns_on_a_moved_id_and_exits_0(cli, write_recipe):
    path = write_recipe(RECIPE % OLD + "  controlnet: runwayml/stable-diffusion-inpainting\n")
    result = cli("validate", path)
    assert result.exit_code == 0, result.output
    assert (
        f"{path}:4:3: warning: model.base: '{OLD}' was removed from the Hugging Face hub; it is now '{NEW}'"
        in (result.stderr)
    )
    assert f"use model.base: {NEW}" in result.stderr
    assert f"{path}:5:3: warning: model.controlnet:" in result.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-inpainting" in result.stderr
    assert "valid (t)" in result.stdout


def test_validate_json_carries_the_warnings(cli, write_recipe):
    path = write_recipe(RECIPE % OLD)
    result = cli("validate", path, "--json")
    assert result.exit_code == 0
    entry = json.loads(result.stdout)["files"][0]
    assert entry["valid"] is True and entry["preset"] is False
    assert [(w["path"], w["line"], w["column"]) for w in entry["warnings"]] == [("model.base", 4, 3)]
    assert NEW in entry["warnings"][0]["hint"]
    assert result.stderr == ""  # JSON mode: the warnings are in the payload only


def test_no_warning_for_the_new_id_a_compvis_id_or_a_local_folder(cli, write_recipe, tmp_path):
    for base in (NEW, "CompVis/stable-diffusion-v1-4"):
        result = cli("validate", write_recipe(RECIPE % base))
        assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    (tmp_path / "runwayml" / "stable-diffusion-v1-5").mkdir(parents=True)  # a folder named like the old id
    result = cli("validate", write_recipe(RECIPE % OLD))
    assert "warning" not in result.stderr


def test_every_command_that_loads_a_recipe_warns_with_the_origin_in_the_preset(cli, write_recipe):
    write_recipe(f"model: {{base: {OLD}}}\n", "base/old.yaml")
    path = write_recipe("extends: base/old.yaml\nname: t\ndataset: {source: {hub: a/b}}\n")
    result = cli("show", path)
    assert result.exit_code == 0
    assert "base/old.yaml:1:9: warning: model.base:" in result.stderr
    assert f"base: {OLD}" in result.stdout  # still loads as written


# --- presets ---------------------------------------------------------------------------------


def test_shipped_presets_validate_as_presets(cli):
    presets = sorted((Path(__file__).resolve().parents[2] / "recipes" / "base").glob("*.yaml"))
    result = cli("validate", *presets)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("valid preset") == len(presets) >= 4
    for p in presets:  # no $schema line: editors would flag the missing name and dataset
        assert "$schema=" not in p.read_text().splitlines()[0]


def test_a_preset_gets_every_per_field_check_with_its_location(cli, write_recipe):
    path = write_recipe(
        "dataset:\n  resolution: 500\n  colums: {}\ntrain:\n  batch_size: four\n  learnin_rate: 1\n",
        "base/bad.yaml",
    )
    result = cli("validate", path)
    assert result.exit_code == 2
    err = result.stderr
    assert f"{path}:2:3: error: dataset.resolution: must be a multiple of 8" in err
    assert (
        f"{path}:3:3: error: dataset.colums: unknown field 'colums'" in err
        and "did you mean 'columns'?" in err
    )
    assert f"{path}:5:3: error: train.batch_size:" in err
    assert f"{path}:6:3: error: train.learnin_rate:" in err
    assert "name" not in err.replace(str(path), "")  # required fields may be missing


def test_a_preset_leaves_cross_field_checks_to_the_recipes_extending_it(cli, write_recipe):
    # Each of these fails in a whole recipe, and a recipe extending the preset may set the other half.
    path = write_recipe(
        "# a preset for SDXL recipes\n# recipe-runner: preset\n"
        "train: {micro_conditioning: {}, ema_offload: true}\nevaluate: {enabled: true}\n"
        "dataset: {source: {split: validation}}\ncondition: {low_threshold: 50}\n",
        "sdxl-extras.yaml",
    )
    result = cli("validate", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"][0]["preset"] is True


def test_a_file_is_a_preset_only_by_its_folder_or_its_marker(cli, write_recipe):
    path = write_recipe("train: {batch_size: 2}\n", "common.yaml")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "name: required field is missing" in result.stderr
    assert "keep it in a folder named base/ or put a `# recipe-runner: preset` line" in result.stderr
    marked = write_recipe("train: {batch_size: 2}\n# recipe-runner: preset\n", "late-marker.yaml")
    assert cli("validate", marked).exit_code == 2  # the marker belongs in the header comments


def test_moved_id_in_a_preset_is_warned(cli, write_recipe):
    path = write_recipe(f"model:\n  base: {OLD}\n", "base/sd15.yaml")
    result = cli("validate", path)
    assert result.exit_code == 0
    assert f"{path}:2:3: warning: model.base:" in result.stderr


# --- recipe diff --git of a recipe added since REV -------------------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_diff_git_reports_a_file_absent_at_the_revision_as_new(cli, tmp_path, write_recipe):
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    write_recipe("# placeholder\n", "README.yaml")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    path = write_recipe(RECIPE % NEW + "train: {max_steps: 77}\n", "recipes/new.yaml")
    result = cli("diff", "--git", "HEAD", path, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "@HEAD (absent: new recipe)" in result.stdout
    assert "new recipe: nothing to compare with, every stage runs" in result.stdout
    assert "| `max_steps` (added) |  | `77` |" in result.stdout
    assert f"| `base` (added) |  | `{NEW}` |" in result.stdout
    payload = json.loads(cli("diff", "--git", "HEAD", path, "--json").stdout)
    assert payload["new_recipe"] is True and payload["implications"][0]["code"] == "new-recipe"
    assert cli("diff", "--git", "HEAD", path, "--exit-code").exit_code == 1  # it differs from nothing
    assert cli("diff", "--git", "no-such-rev", path).exit_code == 2  # a bad revision is still an error
