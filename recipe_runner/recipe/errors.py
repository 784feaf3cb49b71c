"""Turn Pydantic's validation errors into located, human problems with did-you-mean hints."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from recipe_runner.errors import Problem
from recipe_runner.recipe.base import FieldError, FieldErrors
from recipe_runner.recipe.condition import CONDITION_TYPES
from recipe_runner.recipe.yaml_io import Origin, Path_

MISSING = "required field is missing"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _condition_class(data: Any) -> type[BaseModel] | None:
    from recipe_runner.recipe.condition import Condition

    kind = data.get("type") if isinstance(data, dict) else None
    union = typing.get_args(Condition)[0]
    for cls in typing.get_args(union):
        if cls.model_fields["type"].default == kind:
            return cls
    return None


def model_at(path: Path_, data: Any) -> type[BaseModel] | None:
    """The recipe model class that describes the mapping at `path` (used for did-you-mean)."""
    from recipe_runner.recipe.recipe import Recipe

    cls: type[BaseModel] | None = Recipe
    node = data
    for key in path:
        if cls is None or not isinstance(key, str) or key not in cls.model_fields:
            return None
        node = node.get(key) if isinstance(node, dict) else None
        if cls is Recipe and key == "condition":
            cls = _condition_class(node)
        else:
            cls = _submodel(cls.model_fields[key].annotation)
    return cls


def _suggest(word: str, options: typing.Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}?" if match else None


def _clean_loc(loc: tuple) -> Path_:
    out = list(loc)
    # Pydantic puts the discriminator tag into the location of union members.
    if len(out) > 1 and out[0] == "condition" and out[1] in CONDITION_TYPES:
        del out[1]
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems_from_validation(
    error: ValidationError, data: dict, origins: dict[Path_, Origin], file: str
) -> list[Problem]:
    problems = []
    for err in _each_blamed_field(error.errors(include_url=False)):
        loc = _clean_loc(err["loc"])
        kind = err["type"]
        blamed = err.get("ctx", {}).get("error")
        if isinstance(blamed, FieldError):
            loc = (*loc, *blamed.field)
        msg = err["msg"].removeprefix("Value error, ")
        hint = None
        if kind == "extra_forbidden":
            cls = model_at(loc[:-1], data)
            allowed = list(cls.model_fields) if cls else []
            msg = f"unknown field {loc[-1]!r}"
            hint = _suggest(str(loc[-1]), allowed)
            if allowed and not hint:
                hint = "expected one of: " + ", ".join(allowed)
        elif kind == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag")
            msg = f"unknown condition type {tag!r}"
            hint = _suggest(str(tag), CONDITION_TYPES) or ("expected one of: " + ", ".join(CONDITION_TYPES))
            loc = (*loc, "type")
        elif kind == "union_tag_not_found":
            msg = "a condition needs a `type`"
            hint = "expected one of: " + ", ".join(CONDITION_TYPES)
        elif kind == "missing":
            msg = MISSING
        elif kind == "literal_error":
            msg = f"{msg}, got {_short(err['input'])}"
            expected = [
                s.strip(" '") for s in err.get("ctx", {}).get("expected", "").replace(" or ", ",").split(",")
            ]
            hint = _suggest(str(err["input"]), [e for e in expected if e])
        elif not isinstance(err.get("input"), (dict, list)) and kind != "value_error":
            msg = f"{msg}, got {_short(err['input'])}"
        origin = _nearest(loc, origins)
        problems.append(
            Problem(
                msg,
                path=".".join(str(p) for p in loc),
                file=origin.file if origin else file,
                line=origin.line if origin else None,
                column=origin.column if origin else None,
                hint=hint,
            )
        )
    return problems


def _each_blamed_field(errors: list[dict]) -> list[dict]:
    """Pydantic's errors, with a FieldErrors (several cross-field checks of one validator) as one error
    per FieldError, so that each is reported at its own field."""
    out = []
    for err in errors:
        blamed = err.get("ctx", {}).get("error")
        if isinstance(blamed, FieldErrors):
            out += [{**err, "msg": str(e), "ctx": {**err["ctx"], "error": e}} for e in blamed.errors]
        else:
            out.append(err)
    return out


def _nearest(loc: Path_, origins: dict[Path_, Origin]) -> Origin | None:
    for i in range(len(loc), 0, -1):
        if loc[:i] in origins:
            return origins[loc[:i]]
    return None
