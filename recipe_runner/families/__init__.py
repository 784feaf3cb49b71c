"""Model families behind one interface (families/base.py): a new family is a module and a line here.

    family = family_of(recipe)          # the recipe's model.family (or the one its base's name suggests)
    c = family.load(loaded, base, denoiser=True, controlnet=True, weights=True)

Importing this package needs no torch (the review tools read the families' figures); loading.py and
the families' methods import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recipe_runner.families.base import Components, Figures, ModelFamily, ModelSize
from recipe_runner.families.flux import FLUX
from recipe_runner.families.sd3 import SD3
from recipe_runner.families.stable_diffusion import SD1, SD2, SDXL

if TYPE_CHECKING:
    from recipe_runner.recipe.recipe import Recipe

# Keys are the recipe's `model.family` names (recipe/model.py's Family; a test keeps the two equal).
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}


def family_of(recipe: Recipe) -> ModelFamily:
    """The family the recipe trains for."""
    return FAMILIES[recipe.model.resolved_family]


__all__ = ["FAMILIES", "Components", "Figures", "ModelFamily", "ModelSize", "family_of"]
