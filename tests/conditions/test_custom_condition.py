"""The `custom` condition: the user's function, imported late from beside the recipe, errors as UserError."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recipe_runner.conditions import build_condition
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import CustomCondition


@pytest.fixture
def recipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A recipe folder; sys.path is restored and modules imported from the folder forgotten after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def forget() -> None:
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]

    request.addfinalizer(forget)
    return tmp_path


def _module(folder: Path, name: str, source: str, first_line: str = "") -> None:
    path = folder / (name.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(first_line + textwrap.dedent(source))


def _custom(function: str, folder: Path, **params):
    return build_condition(CustomCondition(function=function, params=params), base_dir=folder)


def _error(fn, image: Image.Image | None = None) -> UserError:
    with pytest.raises(UserError) as info:
        fn(image or Image.new("RGB", (32, 24)))
    return info.value


CONDS = """
    import numpy as np
    from PIL import Image, ImageOps

    def invert(image, strength=1.0):
        return Image.blend(image, ImageOps.invert(image), strength)

    def grey_array(image):
        return np.asarray(image.convert("L"))

    def rgb_array(image):
        return np.asarray(image)[:, :, ::-1].copy()

    def half(image):
        return image.resize((image.width // 2, image.height // 2))

    def fails(image):
        raise ValueError("no edges here")

    def nothing(image):
        return None

    def floats(image):
        return np.zeros((image.height, image.width), dtype=np.float32)

    NOT_A_FUNCTION = 3
"""


def test_function_beside_the_recipe_with_params(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_params", CONDS)
    image = Image.new("L", (32, 24), 10)
    out = _custom("conds_params:invert", recipe_dir, strength=1.0)(image)
    assert out.mode == "RGB" and out.size == (32, 24) and out.getpixel((0, 0)) == (245, 245, 245)
    assert _custom("conds_params:invert", recipe_dir, strength=0.0)(image).getpixel((0, 0)) == (10, 10, 10)


def test_function_in_a_package(recipe_dir: Path) -> None:
    _module(recipe_dir, "mypkg_conds/__init__", "")
    _module(recipe_dir, "mypkg_conds.edges", CONDS)
    assert _custom("mypkg_conds.edges:invert", recipe_dir)(Image.new("RGB", (8, 8))).getpixel((0, 0)) == (
        255,
        255,
        255,
    )


def test_arrays_and_other_sizes_become_rgb_of_the_input_size(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_arrays", CONDS)
    image = Image.new("RGB", (32, 24), (10, 20, 30))
    assert _custom("conds_arrays:grey_array", recipe_dir)(image).mode == "RGB"
    assert _custom("conds_arrays:rgb_array", recipe_dir)(image).getpixel((3, 3)) == (30, 20, 10)
    assert _custom("conds_arrays:half", recipe_dir)(image).size == (32, 24)


def test_building_runs_no_user_code(recipe_dir: Path) -> None:
    _module(
        recipe_dir, "conds_marker", CONDS, first_line=f"open({str(recipe_dir / 'imported')!r}, 'w').close()\n"
    )
    fn = _custom("conds_marker:invert", recipe_dir)
    assert not (recipe_dir / "imported").exists() and "conds_marker" not in sys.modules
    fn(Image.new("RGB", (4, 4)))
    assert (recipe_dir / "imported").exists()


def test_module_not_found_names_it_and_the_search_path(recipe_dir: Path) -> None:
    error = _error(_custom("no_such_conds:fn", recipe_dir))
    assert error.message == "condition.function: no module named 'no_such_conds' (from 'no_such_conds:fn')"
    assert "put no_such_conds.py beside the recipe" in error.hint and str(recipe_dir) in error.hint


def test_module_with_a_missing_dependency(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_dep", "import not_installed_dependency_xyz\n")
    error = _error(_custom("conds_dep:fn", recipe_dir))
    assert "module 'conds_dep' imports 'not_installed_dependency_xyz'" in error.message


def test_module_with_a_syntax_error(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_syntax", "def fn(image)\n    return image\n")
    error = _error(_custom("conds_syntax:fn", recipe_dir))
    assert "importing 'conds_syntax' failed: SyntaxError: " in error.message
    assert "conds_syntax.py, line 1)" in error.message and "frozen" not in error.message


def test_module_failing_at_import(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_broken", "x = 1\nraise RuntimeError('boom')\n")
    error = _error(_custom("conds_broken:fn", recipe_dir))
    assert "importing 'conds_broken' failed: RuntimeError: boom (conds_broken.py:2)" in error.message


def test_missing_attribute_suggests_a_name(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_attr", CONDS)
    error = _error(_custom("conds_attr:invrt", recipe_dir))
    assert "has no 'invrt'" in error.message and "conds_attr.py" in error.message
    assert error.hint == "did you mean conds_attr:invert?"


def test_not_callable(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_value", CONDS)
    error = _error(_custom("conds_value:NOT_A_FUNCTION", recipe_dir))
    assert error.message == "condition.function: conds_value:NOT_A_FUNCTION is a int, not a function"


def test_function_raising_names_the_exception_and_line(recipe_dir: Path) -> None:
    _module(recipe_dir, "conds_raise", CONDS)
    error = _error(_custom("conds_raise:fails", recipe_dir))
    assert "conds_raise:fails raised ValueError: no edges here (conds_raise.py:" in error.message
    assert "32x24 image" in error.message
    assert isinstance(error.__cause__, ValueError)


@pytest.mark.parametrize(
    ("name", "said"),
    [("nothing", "returned NoneType None, not an image"), ("floats", "shape (24, 32) and dtype float32")],
)
def test_function_returning_a_non_image(recipe_dir: Path, name: str, said: str) -> None:
    _module(recipe_dir, f"conds_{name}", CONDS)
    error = _error(_custom(f"conds_{name}:{name}", recipe_dir))
    assert said in error.message
    assert "uint8 array of shape HxW or HxWx3" in error.hint


def test_the_function_gets_a_copy(recipe_dir: Path) -> None:
    _module(
        recipe_dir,
        "conds_mutate",
        "def paint(image):\n    image.paste((255, 0, 0), (0, 0, 4, 4))\n    return image\n",
    )
    image = Image.new("RGB", (4, 4))
    assert _custom("conds_mutate:paint", recipe_dir)(image).getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert np.asarray(image).sum() == 0


def _dataset_recipe(folder: Path, function: str):
    from recipe_runner.recipe.loader import load_recipe

    path = folder / "recipe.yaml"
    path.write_text(
        "name: t\n"
        "dataset: {source: {builtin: shapes, num_samples: 4}, resolution: 32}\n"
        f"condition: {{type: custom, function: '{function}'}}\n"
    )
    return load_recipe(path)


def test_editing_the_function_rebuilds_the_dataset(recipe_dir: Path) -> None:
    import datasets

    from recipe_runner.data.build import build_dataset, dataset_cache_key, dataset_status
    from recipe_runner.runfolder.layout import RunFolder

    _module(recipe_dir, "conds_edited", "from PIL import ImageOps\n\ndef make(image):\n    return image\n")
    folder = RunFolder(recipe_dir / "run")
    loaded = _dataset_recipe(recipe_dir, "conds_edited:make")
    first_key = build_dataset(loaded, folder)["cache_key"]
    assert build_dataset(loaded, folder)["cached"] is True
    before = datasets.load_from_disk(str(folder.dataset_data))["train"][0]["conditioning_image"]

    _module(
        recipe_dir,
        "conds_edited",
        "from PIL import ImageOps\n\ndef make(image):\n    return ImageOps.invert(image)\n",
    )
    assert dataset_cache_key(loaded) != first_key
    cached, why = dataset_status(loaded, folder)
    assert not cached and why == "condition changed (the code in conds_edited.py changed)"
    del sys.modules["conds_edited"]  # imported by the first build; a new `recipe` process starts afresh
    assert build_dataset(loaded, folder)["cached"] is False
    after = datasets.load_from_disk(str(folder.dataset_data))["train"][0]["conditioning_image"]
    assert after.tobytes() != before.tobytes()
    assert dataset_status(loaded, folder)[0] is True


def test_the_key_covers_a_package_without_importing_it(recipe_dir: Path) -> None:
    from recipe_runner.data.build import dataset_cache_key, key_inputs

    marker = f"open({str(recipe_dir / 'imported')!r}, 'w').close()\nraise RuntimeError('boom')\n"
    _module(recipe_dir, "edges_pkg/__init__", marker)
    _module(recipe_dir, "edges_pkg.detect", marker + "from edges_pkg.helpers import blur\n")
    _module(recipe_dir, "edges_pkg.helpers", "def blur(image):\n    return image\n")
    loaded = _dataset_recipe(recipe_dir, "edges_pkg.detect:edges")
    key = dataset_cache_key(loaded)
    code = key_inputs(loaded)["condition"]["code"]
    assert code["source"] == "edges_pkg" and code["files"] == 3
    assert not (recipe_dir / "imported").exists()
    assert not any(name.startswith("edges_pkg") for name in sys.modules)

    _module(recipe_dir, "edges_pkg.helpers", "def blur(image):\n    return image.copy()\n")
    assert dataset_cache_key(loaded) != key  # a helper in the same package is part of the code


def test_a_module_found_only_by_importing_keys_by_name(recipe_dir: Path) -> None:
    from recipe_runner.data.build import dataset_cache_key, key_inputs

    _module(recipe_dir, "edges_ns.detect", "def edges(image):\n    return image\n")  # no __init__.py
    loaded = _dataset_recipe(recipe_dir, "edges_ns.detect:edges")
    assert key_inputs(loaded)["condition"]["code"] is None  # a namespace package: no folder of its own
    assert len(dataset_cache_key(loaded)) == 64
    assert "edges_ns" not in sys.modules
