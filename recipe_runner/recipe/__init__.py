"""Recipe format (Pydantic models) and loading. Nothing here imports torch."""

from recipe_runner.recipe.loader import load_recipe
from recipe_runner.recipe.recipe import Recipe

__all__ = ["Recipe", "load_recipe"]
