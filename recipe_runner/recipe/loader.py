"""One path from file to a validated recipe: YAML -> `extends` -> `--set` -> Pydantic.

Every problem found on the way is collected into one `RecipeError`, each mapped back
to the file:line:col (or the `--set`) it came from.
"""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recipe_runner.errors import Problem, RecipeError
from recipe_runner.recipe.dataset import SOURCE_KINDS
from recipe_runner.recipe.errors import MISSING, problems_from_validation
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.recipe.yaml_io import MAX_FILE_BYTES, Origin, Path_, YamlError, parse, parse_value


def resolve_against(base_dir: Path | None, ref: str) -> Path:
    """The one rule for paths in a recipe: `~` expanded, relative to `base_dir` (the recipe's folder),
    absolute and normalised. Every stage gets paths through this, so none joins them differently."""
    path = Path(ref).expanduser()
    return Path(os.path.abspath(base_dir / path)) if base_dir is not None else path


@dataclass
class LoadedRecipe:
    """A validated recipe plus where it came from (relative paths resolve against `base_dir`)."""

    recipe: Recipe
    path: Path
    data: dict[str, Any]
    origins: dict[Path_, Origin]
    overrides: list[str] = field(default_factory=list)

    files: list[Path] = field(default_factory=list)
    """The recipe file and every file it extends, absolute (a run folder must not hold any of them)."""

    @property
    def base_dir(self) -> Path:
        """The recipe's folder, absolute: relative paths in the recipe resolve against it, whatever the
        working directory (and however the recipe was named on the command line)."""
        return Path(os.path.abspath(self.path.parent))

    def resolve(self, ref: str) -> Path:
        """A path from the recipe as an absolute path: `~` expanded, relative to the recipe's folder."""
        return resolve_against(self.base_dir, ref)

    def origin_of(self, path: Path_) -> Origin | None:
        return origin_of(self.origins, path)


def origin_of(origins: dict[Path_, Origin], path: Path_) -> Origin | None:
    """Where the value at `path` (or the nearest mapping above it) was written."""
    for i in range(len(path), 0, -1):
        if path[:i] in origins:
            return origins[path[:i]]
    return None


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read(path: Path, display: str) -> tuple[Any, dict[Path_, Origin]]:
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):  # a FIFO would block and /dev/zero never end: read regular files only
            raise RecipeError([Problem("is not a regular file (a device, pipe or socket?)", file=display)])
        with open(path, "rb") as handle:  # bounded: the YAML parser refuses anything this large
            raw = handle.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise RecipeError(
                [
                    Problem(
                        f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a recipe is small", file=display
                    )
                ]
            )
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("file not found", file=display)]) from None
    except IsADirectoryError:
        raise RecipeError([Problem("is a folder, not a recipe file", file=display)]) from None
    except PermissionError:
        raise RecipeError([Problem("permission denied: cannot read the file", file=display)]) from None
    except OSError as e:
        raise RecipeError([Problem(f"cannot read the file: {e.strerror or e}", file=display)]) from None
    except UnicodeDecodeError as e:
        raise RecipeError([Problem(f"not UTF-8 text ({e.reason} at byte {e.start})", file=display)]) from None
    try:
        return parse(text, display)
    except YamlError as e:
        raise RecipeError(e.problems) from None


# Sections that are a union: a child that picks another kind replaces the parent's mapping instead of
# merging into it (`condition: {type: hed}` over canny drops `low_threshold`; `source: {path: x}` over a
# builtin drops `num_samples`). The kind is the condition's `type`, and which of hub/path/builtin is set.
_KINDS: dict[Path_, Any] = {
    ("condition",): lambda m: m.get("type"),
    ("dataset", "source"): lambda m: frozenset(k for k in SOURCE_KINDS if k in m) or None,
}


def _switches_kind(path: Path_, base: dict, over: dict) -> bool:
    kind = _KINDS.get(path)
    return kind is not None and kind(over) is not None and kind(over) != kind(base)


def deep_merge(base: Any, over: Any, path: Path_ = ()) -> Any:
    """Mappings merge key by key (unless `over` switches a union's kind); anything else (lists included)
    in `over` replaces `base`."""
    if isinstance(base, dict) and isinstance(over, dict) and not _switches_kind(path, base, over):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v, (*path, k)) if k in base else v
        return out
    return over


def _present(path: Path_, data: Any) -> bool:
    for key in path:
        if (isinstance(data, dict) and key in data) or (
            isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        ):
            data = data[key]
        else:
            return False
    return True


def _merge_origins(base: dict, over: dict, over_data: Any) -> dict:
    def replaced(p: Path_) -> bool:
        node = over_data
        for i, key in enumerate(p):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
            if not isinstance(node, dict) and i < len(p):
                return True
        return False

    merged = {p: o for p, o in base.items() if not replaced(p)}
    merged.update(over)
    return merged


def _load_tree(
    path: Path, stack: tuple[Path, ...], problems: list[Problem], files: list[Path] | None = None
) -> tuple[dict, dict[Path_, Origin]]:
    """Read `path` and everything it extends; `extends` problems are appended to `problems` so that the
    rest of the file is still checked. Each file read is appended to `files` (absolute)."""
    display = _display(path)
    data, origins = _read(path, display)
    if files is not None:
        files.append(Path(os.path.abspath(path)))
    if not isinstance(data, dict):
        raise RecipeError(
            [Problem("a recipe must be a mapping of sections (name:, dataset:, ...)", file=display)]
        )
    extends = data.pop("extends", None)
    if extends is None:
        return data, origins
    parents = [extends] if isinstance(extends, str) else extends
    where = origins.get(("extends",))
    merged: dict = {}
    merged_origins: dict[Path_, Origin] = {}
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        problems.append(_at(where, "extends", "expected a file path or a list of file paths"))
        parents = []
    for parent in parents:
        target = (path.parent / Path(parent).expanduser()).resolve()
        if target in stack or target == path.resolve():
            chain = " -> ".join(_display(p) for p in (*stack, path.resolve(), target))
            problems.append(_at(where, "extends", f"extends cycle: {chain}"))
            continue
        if not target.is_file():
            problems.append(_at(where, "extends", f"extended file {parent!r} not found (looked at {target})"))
            continue
        try:
            pdata, porigins = _load_tree(target, (*stack, path.resolve()), problems, files)
        except RecipeError as e:
            problems.extend(e.problems)
            continue
        merged_origins = _merge_origins(merged_origins, porigins, pdata)
        merged = deep_merge(merged, pdata)
    origins.pop(("extends",), None)
    result = deep_merge(merged, data)
    kept = _merge_origins(merged_origins, origins, data)
    return result, {p: o for p, o in kept.items() if _present(p, result)}  # none for a replaced union


def _at(origin: Origin | None, path: str, msg: str, hint: str | None = None) -> Problem:
    if origin is None:
        return Problem(msg, path=path, hint=hint)
    return Problem(msg, path=path, file=origin.file, line=origin.line, column=origin.column, hint=hint)


def apply_override(data: dict, origins: dict[Path_, Origin], expr: str) -> None:
    """Apply one `--set a.b.c=value`; the value replaces whatever was at that path."""
    origin = Origin(f"--set {expr}")
    if "=" not in expr:
        raise RecipeError(
            [_at(origin, "", "expected --set path.to.field=value, e.g. train.learning_rate=5e-5")]
        )
    dotted, _, text = expr.partition("=")
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in dotted.strip().split(".")]
    if not dotted.strip() or any(k == "" for k in keys):
        raise RecipeError([_at(origin, dotted, "empty field name in the path")])
    try:
        value = parse_value(text, origin.file)
    except YamlError as e:
        raise RecipeError([_at(origin, dotted, e.problems[0].message)]) from None
    if keys[0] == "condition" and len(keys) > 1 and "condition" not in data:
        # The condition is a union chosen by `type`: start from the default one so that
        # `--set condition.low_threshold=50` tunes the default canny instead of failing for lack of a type.
        default = Recipe.model_fields["condition"].get_default(call_default_factory=True)
        data["condition"] = {"type": default.type}
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        here = ".".join(map(str, keys[: i + 1]))
        if isinstance(node, dict):
            node = node.setdefault(key, {}) if not isinstance(key, int) else None
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            node = None
        if not isinstance(node, (dict, list)):
            raise RecipeError([_at(origin, here, f"cannot set inside {here!r}: it is not a mapping or list")])
    last = keys[-1]
    if isinstance(node, list) and (not isinstance(last, int) or last >= len(node)):
        raise RecipeError([_at(origin, dotted, f"list index {last} out of range (length {len(node)})")])
    node[last] = value
    path = tuple(keys)
    for i in range(1, len(path)):
        origins.setdefault(path[:i], origin)
    for p in [p for p in origins if p[: len(path)] == path]:
        del origins[p]
    origins[path] = origin
    if isinstance(value, (dict, list)):
        _stamp(value, path, origins, origin)


def _stamp(value: Any, path: Path_, origins: dict, origin: Origin) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        origins[(*path, k)] = origin
        if isinstance(v, (dict, list)):
            _stamp(v, (*path, k), origins, origin)


def load_data(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    problems: list[Problem] | None = None,
    files: list[Path] | None = None,
) -> tuple[dict, dict]:
    """The merged, overridden recipe data and its origins, before validation.

    Problems that do not stop the rest from being checked go into `problems` (raised if it is None);
    the files read (the recipe and what it extends) go into `files`."""
    collected: list[Problem] = []
    data, origins = _load_tree(Path(path), (), collected, files)
    for expr in overrides:
        try:
            apply_override(data, origins, expr)
        except RecipeError as e:
            collected.extend(e.problems)
    if problems is None and collected:
        raise RecipeError(collected)
    if problems is not None:
        problems.extend(collected)
    return data, origins


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Load, merge, override and validate one recipe; raises `RecipeError` with every problem."""
    path = Path(path)
    problems: list[Problem] = []
    files: list[Path] = []
    data, origins = load_data(path, overrides, problems, files)
    try:
        recipe = Recipe.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        found = problems_from_validation(e, data, origins, _display(path))
        if problems:  # a base that failed to load would make every field it sets look missing
            found = [p for p in found if p.message != MISSING]
        problems.extend(found)
    if problems:
        raise RecipeError(sorted(problems, key=_order))
    return LoadedRecipe(recipe, path, data, origins, list(overrides), files)


def _order(p: Problem) -> tuple:
    return (p.file is None, p.file or "", p.line or 0, p.column or 0)


def load_resolved(data: dict, base_dir: Path, label: str = "run.lock.json") -> LoadedRecipe:
    """A recipe from already-resolved data (e.g. a lock file's); paths resolve against base_dir."""
    try:
        recipe = Recipe.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        raise RecipeError(problems_from_validation(e, data, {}, label)) from None
    return LoadedRecipe(recipe, Path(base_dir) / label, data, {}, [])
