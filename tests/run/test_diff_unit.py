"""run/diff.py without the CLI: field differences, stages they invalidate, and implications."""

from __future__ import annotations

from recipe_runner.recipe.recipe import Recipe
from recipe_runner.run.diff import Change, diff_data, diff_recipes, list_delta, ratio, stage_of

BASE = {
    "name": "x",
    "dataset": {"source": {"builtin": "shapes", "num_samples": 64}, "resolution": 64},
    "model": {"base": "builtin:tiny-sd"},
    "train": {"max_steps": 10, "batch_size": 2},
}


def recipe(**sections: dict) -> Recipe:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return Recipe.model_validate(data)


def texts(a: Recipe, b: Recipe) -> list[str]:
    return [i.text for i in diff_recipes(a, b).implications]


def test_diff_data_kinds_and_nesting():
    a = {"x": 1, "s": {"k": True, "gone": 3}, "l": [1, 2]}
    b = {"x": 1.0, "s": {"k": 1, "new": 4}, "l": [2, 1]}
    changes = diff_data(a, b)
    assert Change(("s", "k"), True, 1) in changes  # a bool is not an int, even if == says so
    assert Change(("s", "gone"), 3, None, "removed") in changes
    assert Change(("s", "new"), None, 4, "added") in changes
    assert Change(("l",), [1, 2], [2, 1]) in changes
    assert all(c.path != ("x",) for c in changes)  # 1 == 1.0


def test_list_delta_and_ratio():
    assert list_delta(["a", "b"], ["b", "c"]) == (["a"], ["c"])
    assert list_delta(1, 2) is None
    assert ratio(1e-5, 2e-5) == "×2"
    assert ratio(2e-5, 1e-5) == "÷2"
    assert ratio(1e-5, 1.5e-5) == "×1.5"


def test_stage_of():
    assert stage_of(("condition", "low_threshold")) == "dataset"
    assert stage_of(("condition", "low_threshold"), computes_condition=False) == "evaluate"
    assert stage_of(("seed",)) == "dataset"
    assert stage_of(("dataset", "resolution")) == "dataset"
    assert stage_of(("dataset", "num_proc")) is None
    assert stage_of(("train", "learning_rate")) == "train"
    assert stage_of(("train", "checkpoint_every")) is None
    assert stage_of(("model", "base")) == "train"
    assert stage_of(("launch", "num_processes")) == "train"
    assert stage_of(("launch", "main_process_port")) is None
    assert stage_of(("output", "dir")) is None


def test_identical_recipes():
    result = diff_recipes(recipe(), recipe(train={"learning_rate": 1e-5}))
    assert result.identical and result.implications == []


def test_scale_lr_reports_effective_learning_rate():
    a = recipe(train={"scale_lr": True})
    b = recipe(train={"scale_lr": True, "batch_size": 4})
    assert "effective learning rate ×2 (2e-05 → 4e-05)" in texts(a, b)


def test_length_only_change_can_resume():
    first = texts(recipe(), recipe(train={"max_steps": 20}))[0]
    assert first.startswith("training reruns") and "--resume" in first


def test_moving_to_more_processes_at_the_same_rows_can_resume():
    two = recipe(train={"batch_size": 1, "max_steps": 20}, launch={"num_processes": 2})
    first = texts(recipe(), two)[0]
    assert "another process count with the same rows per micro-step" in first and "--resume" in first
    other = texts(recipe(), recipe(train={"batch_size": 2}, launch={"num_processes": 2}))[0]
    assert other.startswith("training restarts from scratch")


def test_epochs_instead_of_steps():
    assert "training length 10 steps → 3 epochs" in texts(
        recipe(), recipe(train={"max_steps": None, "num_epochs": 3})
    )


def test_condition_from_data_does_not_rebuild():
    given = {"columns": {"conditioning_image": "edges"}}
    a, b = recipe(dataset=given), recipe(dataset=given, condition={"type": "canny", "low_threshold": 5})
    assert texts(a, b)[0].startswith("only evaluation settings changed")


def test_memory_estimate_change_is_reported():
    a = recipe(model={"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, dataset={"resolution": 512})
    b = recipe(
        model={"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        dataset={"resolution": 512},
        train={"gradient_checkpointing": True},
    )
    assert any(t.startswith("estimated accelerator memory") for t in texts(a, b))
    assert texts(a, b)[0] == "training restarts from scratch; dataset reused"


def test_bookkeeping_only():
    a, b = recipe(), recipe(train={"checkpoint_every": 5}, dataset={"num_proc": 4})
    assert texts(a, b) == ["only dataset.num_proc/train.checkpoint_every changed: no retraining"]
