"""A digest of a custom condition's source, for the dataset cache key: found as `import` would find it,
without importing it (validate, plan and status never run user code).

The module is looked up with importlib's path finder, which reads folders, not modules, over the search
path `conditions/custom.py` imports with: the recipe's folder first, then sys.path. A module in a package
is digested with every .py file of its top-level package folder, so helpers it imports from the same
package count too; a single-file module with that file.
"""

from __future__ import annotations

import hashlib
import sys
from importlib.machinery import PathFinder, SourceFileLoader
from pathlib import Path


def search_path(base_dir: Path | None) -> list[str]:
    """The path `load_function` imports from: the recipe folder goes first unless sys.path has it."""
    if base_dir is None or str(base_dir) in sys.path:
        return list(sys.path)
    return [str(base_dir), *sys.path]


def module_files(module: str, base_dir: Path | None) -> tuple[Path, list[Path]] | None:
    """(where, files): the single module file, or the top-level package folder and its .py files.

    None when the source cannot be found without importing: a namespace package (no folder of its own),
    a zip entry, an extension or bytecode-only module, a finder installed by an editable install, or no
    such module at all (the build will say so when it imports it).
    """
    top, *rest = module.split(".")
    found = PathFinder.find_spec(top, search_path(base_dir))
    if found is None or not isinstance(found.loader, SourceFileLoader) or found.origin is None:
        return None
    spec, name = found, top
    for part in rest:  # each level is searched in its parent's folder, as import does, but not imported
        if not spec.submodule_search_locations:
            return None
        name = f"{name}.{part}"
        spec = PathFinder.find_spec(name, list(spec.submodule_search_locations))
        if spec is None or not isinstance(spec.loader, SourceFileLoader):
            return None
    origin = Path(found.origin)
    if found.submodule_search_locations is None:
        return origin, [origin]
    root = origin.parent
    if _installed(root) and spec.origin is not None:
        # An installed package (skimage, say) changes with its version: its one module is enough, and
        # reading its thousand other files at every `recipe plan` is not.
        return Path(spec.origin), [Path(spec.origin)]
    return root, sorted(p for p in root.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)


def _installed(path: Path) -> bool:
    prefixes = {Path(sys.prefix).absolute(), Path(sys.base_prefix).absolute()}
    return any(path.absolute().is_relative_to(p) for p in prefixes)


def code_digest(module: str, base_dir: Path | None) -> dict | None:
    """{source, files, sha256} of the module's code (file contents, not times: a checkout that leaves
    the code as it was keeps the cache); None when it cannot be located without importing it, and then
    only the function's name and params key the condition."""
    located = module_files(module, base_dir)
    if located is None:
        return None
    where, files = located
    h = hashlib.sha256()
    try:
        for f in files:
            rel = f.name if f == where else f.relative_to(where).as_posix()
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    except OSError:  # unreadable: the import will say so when the build runs
        return None
    return {"source": _shown(where, base_dir), "files": len(files), "sha256": h.hexdigest()}


def _shown(path: Path, base_dir: Path | None) -> str:
    # Relative to the recipe folder when inside it, so that moving the project keeps the cache.
    if base_dir is not None:
        try:
            return path.absolute().relative_to(Path(base_dir).absolute()).as_posix()
        except ValueError:
            pass
    return str(path)
