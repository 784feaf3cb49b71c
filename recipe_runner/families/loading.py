"""Loading a base model: resolve `model.base`, then let the recipe's family load its parts.

A base is a hub id, a local diffusers folder or `builtin:NAME`; a wrong kind of folder (an SD 1.5 folder
under an SDXL recipe, a folder without `unet/`) is a UserError that says what was found, not a
KeyError from deep inside diffusers.
"""

from __future__ import annotations

from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.families import family_of
from recipe_runner.families.base import Components
from recipe_runner.offline import offline_unless_reachable
from recipe_runner.recipe.loader import LoadedRecipe


def resolve_base(loaded: LoadedRecipe, models_cache: Path) -> str:
    """The base model as something from_pretrained accepts: a folder path (builtins are built on first
    use) or a hub id. Local folders are checked here, hub ids when loading."""
    base = loaded.recipe.model.base
    if base.startswith("builtin:"):
        from recipe_runner.models.tiny import resolve_builtin  # builds with diffusers on first use

        return str(resolve_builtin(base.removeprefix("builtin:"), models_cache))
    local = loaded.resolve(base)
    if local.is_dir():
        return str(local.resolve())
    if local.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise UserError(
            f"model.base {base!r}: no diffusers folder at {local}",
            hint="give a folder with model_index.json, unet/, vae/ ..., a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', or builtin:tiny-sd",
        )
    return base


def load_components(
    loaded: LoadedRecipe, base: str, *, unet: bool = True, controlnet: bool = True, weights: bool = True
) -> Components:
    """The recipe's family loads its parts (see ModelFamily.load); `unet`: the denoiser too."""
    family = family_of(loaded.recipe)
    spec, local = loaded.recipe.model, Path(base).is_dir()
    if not local or any(ref and not loaded.resolve(ref).is_dir() for ref in (spec.vae, spec.controlnet)):
        offline_unless_reachable()  # a hub id: without a network, read the cache at once (offline.py)
    if local:
        family.check_folder(loaded.recipe, Path(base))
    return family.load(loaded, base, denoiser=unet, controlnet=controlnet, weights=weights)
