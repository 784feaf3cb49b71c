"""The package's shape: layers that only point down, the installed package under test, one family object
per recipe family name."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import get_args

import recipe_runner

REPO = Path(__file__).resolve().parents[1]
CHECKER = REPO / "scripts" / "check_layers.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_point_down_and_form_no_cycle():
    """The command docs/architecture.md names: `python scripts/check_layers.py`."""
    done = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no cycles" in done.stdout


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    package = tmp_path / "recipe_runner"
    for sub in ("recipe", "training", "data"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "recipe" / "model.py").write_text("def f():\n    from recipe_runner.training import loop\n")
    (package / "training" / "loop.py").write_text("")
    (package / "data" / "a.py").write_text("from recipe_runner.data import b\n")
    (package / "data" / "b.py").write_text("def g():\n    from recipe_runner.data.a import x\n")
    found = _checker().problems(tmp_path)
    assert any("recipe_runner.recipe.model imports recipe_runner.training.loop" in p for p in found), found
    assert "import cycle: recipe_runner.data.a -> recipe_runner.data.b" in found
    assert len(found) == 2


def test_tests_import_the_installed_package():
    """pip install -e . maps recipe_runner to this checkout's recipe_runner/, not a stray copy."""
    assert Path(recipe_runner.__file__).resolve() == REPO / "recipe_runner" / "__init__.py"
    assert importlib.metadata.version("recipe-runner") == recipe_runner.__version__


def test_every_recipe_family_name_has_one_family_object():
    from recipe_runner.families import FAMILIES
    from recipe_runner.models.archs import ARCHS
    from recipe_runner.recipe.model import BUILTIN_MODELS, Family

    assert set(FAMILIES) == set(get_args(Family))
    assert all(f.name == name for name, f in FAMILIES.items())
    assert set(BUILTIN_MODELS.values()) <= set(FAMILIES)
    offline = [f for f in FAMILIES.values() if f.offline_arch is not None]  # SD3: none yet
    assert {f.offline_arch for f in offline} <= set(ARCHS)
    assert all(FAMILIES[ARCHS[f.offline_arch].family] is f for f in offline)
