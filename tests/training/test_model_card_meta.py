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


def usage(tmp_path, base: str, *overrides: str) -> str:
    from recipe_runner.training.model_card import _usage

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE % base)
    return _usage(load_recipe(path, list(overrides)))


def test_the_card_loads_the_weights_with_the_familys_own_classes(tmp_path):
    """A FLUX.1 card said `ControlNetModel.from_pretrained`, which cannot read a FluxControlNetModel."""
    flux = usage(tmp_path, "black-forest-labs/FLUX.1-dev")
    assert 'FluxControlNetModel.from_pretrained("path/to/this/folder/controlnet")' in flux
    assert (
        'FluxControlNetPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", controlnet=controlnet)'
        in flux
    )
    sd3 = usage(tmp_path, "stabilityai/stable-diffusion-3.5-medium", "model.t5=false")
    assert "SD3ControlNetModel.from_pretrained" in sd3
    assert "controlnet=controlnet, text_encoder_3=None, tokenizer_3=None)" in sd3
    sd15 = usage(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "ControlNetModel.from_pretrained" in sd15 and "StableDiffusionControlNetPipeline" in sd15
    assert "pipe =" not in usage(tmp_path, "builtin:tiny-sd3")  # no hub id to load the base from
