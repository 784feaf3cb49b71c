"""The subtle parts of loading: merging, origins, overrides and YAML typing."""

from __future__ import annotations

import pytest

from recipe_runner.errors import RecipeError
from recipe_runner.recipe.loader import deep_merge, load_recipe
from recipe_runner.recipe.yaml_io import parse


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3]}, "c": 2}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}, "inputs are not modified"


def test_yaml_scientific_notation_is_a_float():
    data, _ = parse("a: 1e-5\nb: 1.0e-5\nc: '1e-5'\nd: 3\ne: 2024-01-01\n", "f.yaml")
    assert data == {"a": 1e-5, "b": 1e-5, "c": "1e-5", "d": 3, "e": "2024-01-01"}


def test_origins_point_at_keys():
    _, origins = parse("a:\n  b: 1\n  c:\n    - x\n    - y\n", "f.yaml")
    assert (origins[("a", "b")].line, origins[("a", "b")].column) == (2, 3)
    assert (origins[("a", "c", 1)].line, origins[("a", "c", 1)].column) == (5, 7)


def test_set_on_a_list_item_and_out_of_range(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n"
        "train: {validation: {prompts: [a, b], conditioning_images: []}}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.validation.prompts.5=c"])
    assert "out of range" in info.value.problems[0].message


def test_values_from_a_base_keep_their_origin_file(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 7\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\nname: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n")
    loaded = load_recipe(top)
    assert loaded.recipe.seed == 7
    assert loaded.origins[("seed",)].file.endswith("base.yaml")
    assert loaded.origins[("name",)].file.endswith("top.yaml")


def test_content_hash_ignores_formatting(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("name: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n")
    b.write_text("# comment\ndataset:\n  resolution: 64\n  source:\n    builtin: shapes\nname: t\nseed: 0\n")
    assert load_recipe(a).recipe.content_hash() == load_recipe(b).recipe.content_hash()


def test_set_inside_the_default_condition(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndataset: {source: {builtin: shapes}, resolution: 64}\n")
    loaded = load_recipe(path, ["condition.low_threshold=50"])
    assert loaded.recipe.condition.type == "canny"
    assert loaded.recipe.condition.low_threshold == 50
