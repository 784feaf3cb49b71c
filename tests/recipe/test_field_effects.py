"""Each recipe field's declared effect (recipe/effects.py) against what the consumers do with a change to it.

For every leaf field (every section, every condition type, nested specs) one change to another valid
value; the dataset cache key, the training cache key, the resume check, `recipe diff` and `recipe plan`
must all agree with the field's `Effect`."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from recipe_runner.data.cache_key import dataset_cache_key, key_inputs
from recipe_runner.recipe.effects import STAGES, Effect, RecipeField, effect_of, recipe_fields, switch_of
from recipe_runner.recipe.loader import LoadedRecipe, load_recipe
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.run.diff import diff_recipes
from recipe_runner.run.plan import stage_plans
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.training.keys import changed_fields, comparable, resume_fields, training_cache_key

BASE = {
    "name": "x",
    "dataset": {"source": {"builtin": "shapes", "num_samples": 64}, "resolution": 64},
    "model": {"base": "builtin:tiny-sd"},
    "train": {"max_steps": 10, "batch_size": 2},
}
HUB, FILE = {"hub": "me/data"}, {"path": "data/rows.jsonl"}
# The source a field of `dataset.source` applies to (`builtin` is changed to from a hub source).
SOURCES = {"hub": HUB, "split": HUB, "config": HUB, "revision": HUB, "builtin": HUB, "path": FILE,
           "format": FILE, "conditioning_dir": {"path": "images"}, "streaming": HUB, "webdataset": HUB,
           "shuffle_buffer": {**HUB, "streaming": True}}  # fmt: skip
# What a field needs around it to be changed at all (exact dotted path, or a prefix ending in ".").
CONTEXT: dict[str, dict[str, Any]] = {
    "dataset.buckets.": {"dataset.buckets.enabled": True},
    "train.lora.": {"train.lora": {}},
    "train.micro_conditioning": {"model.base": "builtin:tiny-sdxl"},
    "train.micro_conditioning.": {"model.base": "builtin:tiny-sdxl", "train.micro_conditioning": {}},
    "model.controlnet_layers": {"model.base": "builtin:tiny-sd3"},
    "model.t5": {"model.base": "builtin:tiny-sd3"},
    "model.controlnet_single_layers": {"model.base": "builtin:tiny-flux"},
    "train.flow_matching": {"model.base": "builtin:tiny-sd3"},
    "train.flow_matching.": {"model.base": "builtin:tiny-sd3", "train.flow_matching": {}},
    "train.ema_offload": {"train.ema_decay": 0.99},
    "train.fp8_base": {"train.gradient_checkpointing": True},
    "train.num_epochs": {"train.max_steps": None, "train.num_epochs": 2},
    "train.validation.prompts": {"train.validation": {"prompts": ["a"], "conditioning_images": ["c.png"]}},
    "train.validation.conditioning_images": {
        "train.validation": {"prompts": ["a"], "conditioning_images": ["c.png"]}
    },
    "launch.num_machines": {"launch.accelerate_config": "accelerate.yaml"},
    "output.push_to_hub": {"output.hub_model_id": "me/controlnet"},
    "evaluate.": {"dataset.holdout": 4},
}
# The few values not derived from a field's type, default and constraints: (path to --set, value).
VALUES: dict[str, tuple[str, Any]] = {
    "dataset.resolution": ("dataset.resolution", 128),  # multiples of 8
    "dataset.buckets.step": ("dataset.buckets.step", 32),
    "dataset.source.builtin": ("dataset.source", {"builtin": "shapes", "num_samples": 64}),  # from a hub
    "dataset.source.path": ("dataset.source.path", "data/other.jsonl"),
    "dataset.source.webdataset": ("dataset.source", {"webdataset": "shards/{0..1}.tar"}),  # from a hub
    "dataset.source.conditioning_dir": ("dataset.source.conditioning_dir", "conds"),
    "model.base": ("model.base", "builtin:shapes-sd"),
    "launch.mixed_precision": ("launch.mixed_precision", "bf16"),  # null is train's `no`: another one
    "train.micro_conditioning.crops_coords_top_left": (
        "train.micro_conditioning.crops_coords_top_left",
        [1, 1],
    ),
    "condition.function": ("condition.function", "conds:other"),
    "output.export": ("output.export", ["diffusers"]),  # a list of formats, each once
}
SKIPPED = {"extends": "applied by the loader before validation: no resolved recipe holds it"}


def _leaves() -> list[RecipeField]:
    try:
        fields = recipe_fields()
    except TypeError:  # a field without an effect: test_every_field_declares_an_effect names it
        return []
    sections = {f.path[:-1] for f in fields}
    # An optional section (train.lora) is a leaf too: it is switched on as a whole.
    return [f for f in fields if f.path not in sections or f.info.default is None]


def _id(f: RecipeField) -> str:
    if f.path[0] == "condition":
        return f"condition[{f.owner.model_fields['type'].default}].{'.'.join(f.path[1:])}"
    return f.dotted


def _put(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _context(f: RecipeField) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if f.path[0] == "condition":
        kind = f.owner.model_fields["type"].default
        found["condition"] = {"type": kind, **({"function": "conds:make"} if kind == "custom" else {})}
    if f.path[:2] == ("dataset", "source") and f.path[-1] in SOURCES:
        found["dataset.source"] = SOURCES[f.path[-1]]
    for key, extra in CONTEXT.items():
        if f.dotted == key or (key.endswith(".") and f.dotted.startswith(key)):
            found.update(extra)
    return found


def _kinds(annotation: Any) -> list[Any]:
    """The plain types and literal values a field accepts."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [k for arg in get_args(annotation) for k in _kinds(arg)]
    if origin is Literal:
        return [("literal", v) for v in get_args(annotation)]
    return [origin or annotation]


def _within(info: Any, value: float) -> bool:
    limits = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    return (
        value >= limits.get("ge", value)
        and value > limits.get("gt", value - 1)
        and value <= limits.get("le", value)
        and value < limits.get("lt", value + 1)
    )


def _another(f: RecipeField, current: Any) -> Any:
    """Another valid value, from the field's type, current value and bounds."""
    kinds = _kinds(f.info.annotation)
    literals = [k[1] for k in kinds if isinstance(k, tuple)]
    if literals:
        return next(v for v in [*literals, None] if v != current)
    if current is None and any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
        return {}
    if bool in kinds:
        return not current
    for kind, steps in ((int, (1, -1)), (float, (0.5, 0.1, -0.1))):
        if kind in kinds:
            tries = [current + s for s in steps] + [current / 2] if current is not None else [0.5, 1, 0]
            return next(v for v in tries if kind(v) == v and _within(f.info, v) and v != current)
    if str in kinds:
        return (current or "") + "x"
    if dict in kinds:
        return {**current, "x": 1}
    if list in kinds:
        return [*current, "x"]
    pytest.fail(f"{f.dotted}: no other value known for {f.info.annotation}; add one to VALUES")


def _load(tmp_path: Path, data: dict, sets: list[str] = ()) -> LoadedRecipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path, list(sets))


def _fake_run(folder: RunFolder, loaded: LoadedRecipe) -> None:
    """What a finished run of `loaded` leaves: a built dataset, trained weights and evaluation results."""
    report = {"cache_key": dataset_cache_key(loaded), "key_inputs": key_inputs(loaded), "referenced_files": {},
              "data_sha256": "rows-1", "rows_in": 64, "rows_out": {"train": 60}}  # fmt: skip
    (folder.dataset / "data").mkdir(parents=True)
    (folder.dataset / "data" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (folder.dataset / "report.json").write_text(json.dumps(report))
    for done in (folder.dataset, folder.controlnet):
        done.mkdir(parents=True, exist_ok=True)
        (done / ".complete").write_text("ok\n")
    folder.evaluation.mkdir(parents=True)
    (folder.evaluation / "results.json").write_text("{}")
    train_key = training_cache_key(loaded, "data_sha256:rows-1")
    lock = {"recipe": loaded.recipe.resolved_dict(), "stages": {"train": {"cache_key": train_key}}}
    folder.lock.write_text(json.dumps(lock))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("data/rows.jsonl", "data/other.jsonl", "images/a.png", "conds/a.png", "c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    (tmp_path / "accelerate.yaml").write_text("num_machines: 2\n")
    return tmp_path


def _check(tmp_path: Path, data: dict, set_path: str, value: Any, effect: Effect) -> None:
    """Change `set_path` to `value` in the recipe `data`; every consumer must do what `effect` says."""
    a, b = _load(tmp_path, data), _load(tmp_path, data, [f"{set_path}={json.dumps(value)}"])
    stage = effect.invalidates
    changes = diff_recipes(a.recipe, b.recipe)
    assert changes.changes, f"--set {set_path}={value!r} changed nothing"

    keys_a, keys_b = dataset_cache_key(a), dataset_cache_key(b)
    assert (keys_a != keys_b) == (stage == "dataset"), "dataset cache key"
    # A rebuilt dataset has another fingerprint: the training key sees dataset changes through it.
    trained = training_cache_key(a, keys_a) != training_cache_key(b, keys_b)
    assert trained == (stage in ("dataset", "train")), "training cache key"
    refused = changed_fields(comparable(resume_fields(a.recipe)), comparable(resume_fields(b.recipe)))
    assert (not refused) == effect.resumable, f"resume check: {refused}"

    codes = {"dataset": "rebuild", "train": "retrain-resumable" if effect.resumable else "retrain",
             "evaluate": "reevaluate", "nothing": "no-retrain"}  # fmt: skip
    assert changes.implications[0].code == codes[stage], f"recipe diff: {changes.implications[0].text}"

    folder = RunFolder(tmp_path / "run")
    _fake_run(folder, a)
    plans = {p.name: p for p in stage_plans(b, folder)}
    reruns = STAGES[STAGES.index(stage) :] if stage in ("dataset", "train") else ()
    assert {n for n, p in plans.items() if p.runs} == set(reruns) & set(plans), "recipe plan"
    if reruns:  # the first stage to rerun names the change as the reason
        assert any(c.dotted.startswith(set_path) for c in plans[reruns[0]].changes), plans[reruns[0]].reason
    if stage == "evaluate" and "evaluate" in plans:
        assert "refreshes the results" in plans["evaluate"].reason


@pytest.mark.parametrize("field", _leaves(), ids=_id)
def test_consumers_agree_with_the_declared_effect(field: RecipeField, files: Path):
    if field.dotted in SKIPPED:
        pytest.skip(SKIPPED[field.dotted])
    data = copy.deepcopy(BASE)
    for dotted, value in _context(field).items():
        _put(data, dotted, value)
    if field.path == ("condition", "type"):  # the type picks the section: a whole other condition
        set_path, value = "condition", {"type": "canny" if data["condition"]["type"] != "canny" else "hed"}
    elif field.dotted in VALUES:
        set_path, value = VALUES[field.dotted]
    else:
        current = _load(files, data).recipe.resolved_dict()
        for key in field.path:
            current = current[key]
        set_path, value = field.dotted, _another(field, current)
    _check(files, data, set_path, value, effect_of(field.path))


SWITCHED = [f for f in _leaves() if (s := switch_of(f.path)) is not None and s != f.path]


@pytest.mark.parametrize("field", SWITCHED, ids=_id)
def test_a_section_switched_off_changes_nothing(field: RecipeField, files: Path):
    """Bucket settings while bucketing is off: not keyed, so nothing reruns, and `recipe diff` says so."""
    set_path, value = VALUES.get(field.dotted) or (field.dotted, _another(field, field.info.default))
    _check(files, copy.deepcopy(BASE), set_path, value, Effect("nothing", resumable=True))


CONDITIONS = [f for f in _leaves() if f.path[0] == "condition" and f.path != ("condition", "type")]


@pytest.mark.parametrize("field", CONDITIONS, ids=_id)
def test_a_condition_the_data_brings_only_changes_evaluation(field: RecipeField, files: Path):
    data = copy.deepcopy(BASE)
    data["condition"] = _context(field)["condition"]
    data["dataset"]["columns"] = {"conditioning_image": "edges"}
    set_path, value = VALUES.get(field.dotted) or (
        field.dotted,
        _another(field, _load(files, data).recipe.resolved_dict()["condition"][field.path[1]]),
    )
    _check(files, data, set_path, value, Effect("evaluate", resumable=True))


def test_rows_per_micro_step_move_between_batch_and_processes(files: Path):
    assert effect_of(("train", "batch_size")).same_rows and effect_of(("launch", "num_processes")).same_rows
    a = _load(files, BASE)
    b = _load(files, BASE, ["train.batch_size=1", "launch.num_processes=2"])
    assert not changed_fields(comparable(resume_fields(a.recipe)), comparable(resume_fields(b.recipe)))
    assert "another process count" in diff_recipes(a.recipe, b.recipe).implications[0].text
    assert training_cache_key(a, "d") != training_cache_key(b, "d")


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def test_every_field_declares_an_effect():
    """A field without an Effect of its own or a section to take one from fails, named by its path."""
    missing = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            path = (*prefix, name)
            try:
                effect_of(path)
            except TypeError as e:
                missing.append(str(e))
                continue
            for sub in _models(info.annotation):
                walk(sub, path)

    walk(Recipe, ())
    assert not missing, "\n".join(missing)
    # Sections pass their effect on; the recipe's own fields have nothing to take one from.
    bare = [
        n for n, info in Recipe.model_fields.items() if not any(isinstance(m, Effect) for m in info.metadata)
    ]
    assert not bare, f"declare an Effect on the recipe fields {bare}"
    assert {f.path for f in _leaves()} >= {f.path for f in recipe_fields() if not _models(f.info.annotation)}


def test_unknown_fields_take_their_sections_effect():
    """A recipe recorded by another version may hold fields this one lacks."""
    with pytest.raises(KeyError):
        effect_of(("train", "no_such_field"))
    assert effect_of(("train", "no_such_field"), strict=False).invalidates == "train"
    assert effect_of(("no_such_section",), strict=False).invalidates == "nothing"
    assert effect_of(("condition", "params", "any_key")).invalidates == "dataset"
