"""Warnings about a training run's settings: `recipe plan` shows them and the train stage prints them.

No torch: they read the recipe and a local base's config files.
"""

from __future__ import annotations

import json
from pathlib import Path

from recipe_runner.families import family_of
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe


def _folder_resolution(folder: Path) -> int | None:
    """A local base's own image size: its UNet's sample_size times the VAE's downscaling."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Learning rates past which a run on real SD weights is likely wasted: a whole ControlNet at 5e-4 or
# more (diffusers' script uses 5e-6, its README's examples 1e-5; ten times that and more tend to end in a
# NaN loss or in a ControlNet that swamps the base), a LoRA at 1e-6 or less (it barely moves).
FULL_LR_HIGH, LORA_LR_LOW = 5e-4, 1e-6


def learning_rate_note(recipe: Recipe) -> str | None:
    """A warning for a learning rate far outside what the method trains at (builtin bases are exempt:
    the demo's small model trains at 1e-3)."""
    t = recipe.train
    if recipe.model.base.startswith("builtin:"):
        return None
    if t.lora is None and t.learning_rate >= FULL_LR_HIGH:
        return (
            f"train.learning_rate {t.learning_rate:g} for a whole ControlNet: ControlNets train at 1e-5 "
            "(diffusers' examples); this high, expect a NaN loss or a ControlNet that overrides the base "
            "(or set train.lora, which trains at about 1e-4)"
        )
    if t.lora is not None and t.learning_rate <= LORA_LR_LOW:
        return (
            f"train.learning_rate {t.learning_rate:g} for a LoRA: LoRAs usually train at about 1e-4; this "
            "low, the adapter barely moves"
        )
    return None


def resolution_note(loaded: LoadedRecipe) -> str | None:
    """A warning when dataset.resolution is far from what the base model was trained at (at half or
    double it, a UNet's own images degrade, and the ControlNet learns on top of that)."""

    model, res = loaded.recipe.model, loaded.recipe.dataset.resolution
    if model.base.startswith("builtin:"):
        return None
    local = loaded.resolve(model.base)
    own = _folder_resolution(local) if local.is_dir() else None
    native = (own,) if own else family_of(loaded.recipe).native_resolutions
    if any(0.75 * n <= res <= 1.5 * n for n in native):
        return None
    sizes = " or ".join(f"{n}" for n in native)
    return (
        f"dataset.resolution {res} for a base trained at {sizes} px: far from it, the base model's own "
        f"images degrade (set dataset.resolution: {native[-1]} unless that is the point)"
    )
