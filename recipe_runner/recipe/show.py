"""The resolved recipe as YAML (what `recipe show` prints and the run folder keeps)."""

from __future__ import annotations

import yaml

from recipe_runner.recipe.recipe import Recipe


class _Dumper(yaml.SafeDumper):
    """Block style, keys in model order, long strings kept readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(data: object) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def resolved_yaml(recipe: Recipe, header: str | None = None) -> str:
    text = to_yaml(recipe.resolved_dict())
    return (f"# {header}\n" if header else "") + text
