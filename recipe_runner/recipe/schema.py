"""The JSON Schema of the recipe format, generated from the Pydantic models."""

from __future__ import annotations

import json
from typing import Any

from recipe_runner.recipe.recipe import Recipe

SCHEMA_ID = "https://github.com/recipe-runner/recipe-runner/schemas/recipe.schema.json"


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def schema_text() -> str:
    """Exactly what `recipe schema` prints and `schemas/recipe.schema.json` holds."""
    return json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
