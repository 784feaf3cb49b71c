"""Safe YAML parsing that remembers where every value came from.

PyYAML's safe loader builds plain data but forgets positions and silently keeps the
last of duplicate keys, so we compose the node graph ourselves and construct only
the standard scalar types: every value gets a file:line:col, duplicate keys and
unsafe tags are errors, and alias expansion is bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from recipe_runner.errors import Problem

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64  # a recipe nests 5 deep; deeper is a mistake or an attack, not a recipe

Path_ = tuple[str | int, ...]

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file position, or a `--set` expression (line None)."""

    file: str
    line: int | None = None
    column: int | None = None


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.2), as every user expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class YamlError(Exception):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def parse(text: str, file: str) -> tuple[Any, dict[Path_, Origin]]:
    """Parse one YAML document into plain data and a map from value path to origin."""
    if len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        raise YamlError(
            [Problem(f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a recipe is small", file=file)]
        )
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = " ".join(str(x) for x in (e.context, e.problem) if x)
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise YamlError([Problem(f"invalid YAML: {msg}", file=file, line=line, column=col)]) from None
    except yaml.YAMLError as e:
        raise YamlError([Problem(f"invalid YAML: {e}", file=file)]) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise YamlError([_too_deep(file)]) from None
    finally:
        loader.dispose()
    if node is None:
        return {}, {}
    builder = _Builder(loader, file)
    data = builder.build(node, ())
    if builder.problems:
        raise YamlError(builder.problems)
    return data, builder.origins


def _too_deep(file: str) -> Problem:
    return Problem(f"values nest more than {MAX_DEPTH} levels deep; a recipe nests a few", file=file)


def parse_value(text: str, origin: str) -> Any:
    """A `--set` value, typed as YAML would type it (`5e-5` float, `true` bool, `{a: 1}` mapping)."""
    data, _ = parse(text, origin)
    return data


class _Builder:
    def __init__(self, loader: _Loader, file: str):
        self.loader = loader
        self.file = file
        self.origins: dict[Path_, Origin] = {}
        self.problems: list[Problem] = []
        self.count = 0
        self._active: set[int] = set()

    def _origin(self, node: yaml.Node) -> Origin:
        return Origin(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def _problem(self, node: yaml.Node, msg: str, path: Path_) -> None:
        o = self._origin(node)
        dotted = ".".join(str(p) for p in path)
        self.problems.append(Problem(msg, path=dotted, file=o.file, line=o.line, column=o.column))

    def build(self, node: yaml.Node, path: Path_) -> Any:
        if len(path) > MAX_DEPTH:
            if not any(p.message == _too_deep(self.file).message for p in self.problems):
                self._problem(node, _too_deep(self.file).message, path[:MAX_DEPTH])
            return None
        self.count += 1
        if self.count > MAX_NODES:
            if self.count == MAX_NODES + 1:
                self._problem(
                    node, f"more than {MAX_NODES} values (an alias bomb?); refusing to expand", path
                )
            return None
        if id(node) in self._active:
            self._problem(node, "recursive alias: a value that contains itself", path)
            return None
        self._active.add(id(node))
        try:
            return self._build(node, path)
        finally:
            self._active.discard(id(node))

    def _build(self, node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                self._problem(node, f"tag {node.tag!r} is not allowed; recipes hold plain data only", path)
                return None
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._problem(key_node, "merge keys (<<) are not supported; use `extends:`", path)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self._problem(key_node, "keys must be plain names", path)
                    continue
                key = str(key_node.value)
                if key in out:
                    first = self.origins.get((*path, key))
                    where = f" (first at line {first.line})" if first else ""
                    self._problem(key_node, f"duplicate key {key!r}{where}", (*path, key))
                    continue
                self.origins[(*path, key)] = self._origin(key_node)
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self._problem(node, f"tag {node.tag!r} is not allowed; recipes hold plain data only", path)
                return None
            items = []
            for i, item in enumerate(node.value):
                self.origins[(*path, i)] = self._origin(item)
                items.append(self.build(item, (*path, i)))
            return items
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value  # keep dates as written: no field of a recipe is a date
        if node.tag not in _SCALAR_TAGS:
            self._problem(node, f"tag {node.tag!r} is not allowed; recipes hold plain data only", path)
            return None
        return self.loader.construct_object(node)
