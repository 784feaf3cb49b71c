"""Shipped recipes, the JSON Schema, `show`, and the no-torch promise of `validate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipe_runner.recipe.schema import schema_text

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_is_valid(cli, path):
    result = cli("validate", path)
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../schemas/recipe.schema.json")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert len(header) >= 3, "a shipped recipe starts with a header saying what, on what hardware, how long"


def test_shipped_recipes_cover_the_documented_set():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "fill50k-canny", "uncanny-faces", "color-palette-sd21", "sdxl-canny"} <= names
    assert {"sd15", "low-vram", "fast", "lora"} <= {
        p.stem for p in (REPO / "recipes" / "base").glob("*.yaml")
    }


@pytest.mark.parametrize("preset", sorted((REPO / "recipes" / "base").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_extends_into_a_valid_recipe(cli, write_recipe, preset):
    """As the presets' headers say to use them: after base/sd15.yaml (and low-vram, which lora joins)."""
    base = REPO / "recipes" / "base"
    parents = [base / "sd15.yaml", base / "low-vram.yaml", preset]
    recipe = write_recipe(
        f"extends: {json.dumps([str(p) for p in dict.fromkeys(parents)])}\n"
        "name: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n"
    )
    result = cli("validate", recipe)
    assert result.exit_code == 0, result.output


def test_checked_in_schema_equals_generated():
    assert (REPO / "schemas" / "recipe.schema.json").read_text() == schema_text(), "run `make schema`"


def test_schema_command_prints_it(cli):
    result = cli("schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["title"] == "Recipe"


def _walk(schema: dict, defs: dict, where: str, seen: set):
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}.{name}", prop
        ref = prop.get("$ref") or next(
            (a.get("$ref") for a in prop.get("anyOf", []) if isinstance(a, dict) and "$ref" in a), None
        )
        if ref and ref not in seen:
            seen.add(ref)
            yield from _walk(defs[ref.split("/")[-1]], defs, f"{where}.{name}", seen)


def test_every_field_has_a_description():
    schema = json.loads(schema_text())
    defs = schema["$defs"]
    missing = [path for path, prop in _walk(schema, defs, "recipe", set()) if not prop.get("description")]
    for name, d in defs.items():
        missing += [f"{name}.{k}" for k, p in d.get("properties", {}).items() if not p.get("description")]
    assert not missing, missing


def test_validate_does_not_import_torch():
    code = (
        "import sys; from recipe_runner.cli import app\n"
        "try:\n    app(['validate', 'recipes/demo.yaml', 'recipes/sdxl-canny.yaml'])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'datasets', 'transformers', 'controlnet_aux') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_show_resolves_extends_defaults_and_set(cli, write_recipe):
    write_recipe(
        "train:\n  learning_rate: 2.0e-5\n  validation: {prompts: [a, b], conditioning_images: []}\n",
        name="base.yaml",
    )
    path = write_recipe(
        "extends: base.yaml\nname: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n"
        "train:\n  batch_size: 3\n  validation: {prompts: [], conditioning_images: []}\n",
    )
    result = cli(
        "show",
        path,
        "--set",
        "train.learning_rate=5e-5",
        "--set",
        "dataset.source={builtin: shapes, num_samples: 9}",
    )
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert "extends" not in data
    assert data["train"]["learning_rate"] == 5e-5  # --set wins, YAML-typed (a float, not a string)
    assert data["train"]["batch_size"] == 3  # the file wins over its base
    assert data["train"]["validation"]["prompts"] == []  # lists replace, never concatenate
    assert data["train"]["adam_beta2"] == 0.999  # defaults are filled in
    assert data["dataset"]["source"] == {**data["dataset"]["source"], "builtin": "shapes", "num_samples": 9}
    assert data["condition"]["type"] == "canny"


def test_show_output_is_itself_a_valid_recipe(cli, tmp_path):
    result = cli("show", REPO / "recipes" / "fill50k-canny.yaml")
    assert result.exit_code == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    again = cli("show", resolved)
    assert again.exit_code == 0
    assert yaml.safe_load(again.stdout) == yaml.safe_load(result.stdout)


def test_help_ends_with_examples(cli):
    for args in (["--help"], ["validate", "--help"], ["show", "--help"], ["run", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0
        assert "Examples" in result.stdout, args


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "recipe_runner", "validate", "recipes/demo.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
