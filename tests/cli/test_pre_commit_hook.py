""".pre-commit-hooks.yaml: no torch environment, only recipe files, presets pass, the light hook runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HOOKS_FILE = REPO / ".pre-commit-hooks.yaml"
HOOKS = {h["id"]: h for h in yaml.safe_load(HOOKS_FILE.read_text())}
LIGHT = REPO / "scripts" / "recipe-validate-light.py"


def test_no_hook_installs_the_package():
    # language: python would `pip install .` this repository: torch and the CUDA stack, several GB.
    assert set(HOOKS) == {"recipe-validate", "recipe-validate-light"}
    assert HOOKS["recipe-validate"]["language"] == "system"
    assert HOOKS["recipe-validate"]["entry"] == "recipe validate"
    assert HOOKS["recipe-validate-light"]["language"] == "script"
    assert (REPO / HOOKS["recipe-validate-light"]["entry"]) == LIGHT
    assert os.access(LIGHT, os.X_OK), "pre-commit runs a script hook's entry directly"
    assert not any("additional_dependencies" in h for h in HOOKS.values())


def test_hooks_match_only_recipe_files():
    for hook in HOOKS.values():
        files = re.compile(hook["files"])
        assert files.search("recipes/fill50k.yaml") and files.search("recipes/base/sd15.yml")
        for other in (
            ".github/workflows/ci.yml",
            "config.yaml",
            "docs/recipes.yaml",
            ".pre-commit-config.yaml",
        ):
            assert not files.search(other), (hook["id"], other)


def test_usage_comment_names_no_tag_that_does_not_exist():
    text = HOOKS_FILE.read_text()
    assert "v0.1.0" not in text and not re.search(r"rev:\s*v\d", text)
    assert "commit sha" in text


def _light(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LIGHT), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_light_hook_passes_the_shipped_recipes_and_presets():
    files = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "base").glob("*.yaml"))
    done = _light(*[f.relative_to(REPO) for f in files])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("valid preset") == len(list((REPO / "recipes" / "base").glob("*.yaml")))


def test_light_hook_reports_located_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndataset: {source: {builtin: shapes}}\ntrain: {learnin_rate: 1}\n")
    done = _light(bad)
    assert done.returncode == 2
    assert f"{bad}:3:9: error: train.learnin_rate: unknown field 'learnin_rate'" in done.stderr


def test_light_hook_imports_no_torch():
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(LIGHT)!r}, 'recipes/demo.yaml', 'recipes/base/sd15.yaml']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'datasets', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=60)
