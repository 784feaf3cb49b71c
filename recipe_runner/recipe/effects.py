"""What a change to each recipe field means for a run, declared once, on the field.

A field carries an `Effect` in its `Annotated[...]` metadata, or takes the one of the field that holds
its section (`train: Annotated[TrainSpec, RETRAINS]` covers every train field without its own; each
condition type's fields take `condition`'s). Pydantic keeps the markers in `FieldInfo.metadata` and
leaves them out of the JSON Schema. `effect_of` reads them, and the dataset and training cache keys,
the resume check, `recipe diff` and `recipe plan` derive from it what they key, compare and say.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from recipe_runner.recipe.marks import NOTHING, STAGES, Effect, Stage
from recipe_runner.recipe.recipe import Recipe

__all__ = ["STAGES", "Effect", "RecipeField", "Stage", "effect_of", "keyed", "recipe_fields", "switch_of"]


class RecipeField(NamedTuple):
    path: tuple[str, ...]
    owner: type[BaseModel]  # the section model that has it (one of the condition types, say)
    info: FieldInfo
    effect: Effect

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _declared(info: FieldInfo) -> Effect | None:
    return next((m for m in info.metadata if isinstance(m, Effect)), None)


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The section models a field holds: itself, a union's members, an optional's or a list's item."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


@cache
def effect_of(path: tuple[str, ...], strict: bool = True) -> Effect:
    """The declared effect of a change to the recipe field at `path`, e.g. ("train", "validation",
    "every"), through nested sections and the condition union (the types that have the field must agree);
    a key inside a mapping field (a custom condition's params) takes the field's.

    A path no field has is a KeyError, unless not `strict` (a recipe recorded by another version): then
    it takes its section's effect, and nothing at all outside the sections. A field that declares no
    effect and has no section to take one from is a TypeError."""
    models: list[type[BaseModel]] = [Recipe]
    effect: Effect | None = None
    for depth, name in enumerate(path):
        infos = [m.model_fields[name] for m in models if name in m.model_fields]
        if not infos:
            if effect is not None and not models:
                return effect
            if strict:
                raise KeyError(f"no recipe field {'.'.join(path[: depth + 1])}")
            return NOTHING if effect is None else Effect(effect.invalidates, effect.resumable)
        inherited = None if effect is None else Effect(effect.invalidates, effect.resumable)
        found = {_declared(info) or inherited for info in infos}
        dotted = ".".join(path[: depth + 1])
        if None in found:
            raise TypeError(f"recipe field {dotted} declares no Effect (recipe/marks.py)")
        if len(found) > 1:
            raise TypeError(f"the condition types disagree on the effect of {dotted}: {found}")
        effect = found.pop()
        models = [sub for info in infos for sub in _models(info.annotation)]
    if effect is None:
        raise KeyError("an empty path names no recipe field")
    return effect


def switch_of(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The boolean field that must be on for a change at `path` to count (`keyed_while`), or None."""
    for n in range(len(path), 0, -1):
        switch = effect_of(path[:n], strict=False).keyed_while
        if switch is not None:
            return (*path[:n], switch)
    return None


def keyed(section: BaseModel, path: tuple[str, ...], keep: Callable[[Effect], bool]) -> dict[str, Any]:
    """`section` (the recipe's part at `path`) as JSON data, cut to what a key holds: the fields whose
    effect `keep` accepts, less those at the default they are omitted at and sections switched off by
    their `keyed_while`. A sub-section with nothing kept is left out."""
    data = section.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in type(section).model_fields.items():
        effect, value = effect_of((*path, name)), getattr(section, name)
        if effect.omitted_at_default and value == info.get_default(call_default_factory=True):
            continue
        if isinstance(value, BaseModel):
            if effect.keyed_while is not None and not getattr(value, effect.keyed_while):
                continue
            if sub := keyed(value, (*path, name), keep):
                out[name] = sub
        elif keep(effect):
            out[name] = data[name]
    return out


@cache
def recipe_fields() -> tuple[RecipeField, ...]:
    """Every field of the recipe, sections included, with its effect; a condition field once per type
    that has it."""
    found: list[RecipeField] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            path = (*prefix, name)
            found.append(RecipeField(path, model, info, effect_of(path)))
            for sub in _models(info.annotation):
                walk(sub, path)

    walk(Recipe, ())
    return tuple(found)
