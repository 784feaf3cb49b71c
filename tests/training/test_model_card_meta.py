"""The model card's front matter is what the Hub reads: a real repo id as base_model, the base's license."""

from __future__ import annotations

import yaml

from recipe_runner.recipe.loader import load_recipe
from recipe_runner.training.model_card import _front_matter

RECIPE = "name: c\ndataset: {source: {builtin: shapes, num_samples: 8}, resolution: 64}\nmodel: {base: %s}\n"


def meta(tmp_path, base: str, extra: str = "") -> dict:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % base + extra)
    return yaml.safe_load(_front_matter(load_recipe(path)).strip("-\n"))


def test_hub_base_is_linked_with_its_license(tmp_path):
    sd15 = meta(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert sd15["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd15["license"] == "creativeml-openrail-m" and sd15["inference"] is True
    assert {"controlnet", "diffusers-training", "stable-diffusion"} <= set(sd15["tags"])
    xl = meta(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    assert xl["license"] == "openrail++" and "stable-diffusion-xl" in xl["tags"]


def test_builtin_and_local_bases_are_not_hub_ids(tmp_path):
    assert "base_model" not in meta(tmp_path, "builtin:tiny-sd")
    (tmp_path / "mybase").mkdir()
    assert "base_model" not in meta(tmp_path, "./mybase")


def test_the_recipe_license_wins(tmp_path):
    assert meta(tmp_path, "builtin:tiny-sd", "output: {license: mit}\n")["license"] == "mit"
