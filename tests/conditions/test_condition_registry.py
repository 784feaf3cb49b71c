"""The registry, building, pickling, and what importing the package costs."""

from __future__ import annotations

import pickle

import pytest
from pydantic import TypeAdapter

from recipe_runner.conditions import CONDITIONS, build_condition
from recipe_runner.conditions.base import BaseCondition
from recipe_runner.recipe.condition import CONDITION_TYPES, Condition

_ADAPTER = TypeAdapter(Condition)


def _default(kind: str):
    extra = {"function": "not_imported_yet:fn"} if kind == "custom" else {}
    return _ADAPTER.validate_python({"type": kind, **extra})


def test_registry_covers_every_condition_type() -> None:
    assert set(CONDITIONS) == set(CONDITION_TYPES)
    for kind, cls in CONDITIONS.items():
        assert issubclass(cls, BaseCondition) and cls.type == kind


@pytest.mark.parametrize("kind", CONDITION_TYPES)
def test_every_type_builds_and_pickles_without_loading_anything(kind: str, tmp_path) -> None:
    fn = build_condition(_default(kind), base_dir=tmp_path)
    clone = pickle.loads(pickle.dumps(fn))
    assert type(clone) is type(fn) and clone.cfg == fn.cfg and clone.base_dir == tmp_path.resolve()
    assert repr(fn).startswith(type(fn).__name__ + "(")


def test_pickling_drops_what_setup_loaded(tmp_path) -> None:
    (tmp_path / "conds_pickled.py").write_text("def fn(image):\n    return image\n")
    fn = build_condition(
        _ADAPTER.validate_python({"type": "custom", "function": "conds_pickled:fn"}), base_dir=tmp_path
    )
    fn.setup()
    assert fn._model is not None
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._model is None and not clone._ready
    assert pickle.dumps(fn) == pickle.dumps(build_condition(fn.cfg, base_dir=tmp_path)), (
        "same bytes: same cache key"
    )


IMPORT_CHECK = """
import sys
from PIL import Image
from pydantic import TypeAdapter
from recipe_runner.conditions import build_condition
from recipe_runner.recipe.condition import CONDITION_TYPES, Condition, CannyCondition

adapter = TypeAdapter(Condition)
for kind in CONDITION_TYPES:
    extra = {"function": "not_imported_yet:fn"} if kind == "custom" else {}
    build_condition(adapter.validate_python({"type": kind, **extra}))
for kind in ("canny", "scribble", "shuffle", "color_palette"):
    out = build_condition(adapter.validate_python({"type": kind}))(Image.new("RGB", (32, 32)))
    assert out.size == (32, 32)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "controlnet_aux", "mediapipe", "huggingface_hub"))
assert not heavy, heavy
assert "not_imported_yet" not in sys.modules
print("ok")
"""


def test_importing_and_weight_free_conditions_import_no_torch_or_controlnet_aux(run_python) -> None:
    done = run_python(IMPORT_CHECK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_datasets_map_ships_conditions_to_worker_processes(tmp_path, square) -> None:
    datasets = pytest.importorskip("datasets")
    (tmp_path / "conds_workers.py").write_text(
        "from PIL import ImageOps\n\ndef invert(image):\n    return ImageOps.invert(image)\n"
    )
    images = [square.rotate(angle) for angle in (0, 10, 20, 30)]
    rows = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    for cfg in (
        _default("shuffle"),
        _ADAPTER.validate_python({"type": "custom", "function": "conds_workers:invert"}),
    ):
        fn = build_condition(cfg, base_dir=tmp_path)
        mapped = rows.map(lambda row: {"cond": fn(row["image"])}, num_proc=2)  # noqa: B023
        assert [im.tobytes() for im in mapped["cond"]] == [fn(im).tobytes() for im in images]
