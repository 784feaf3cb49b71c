"""The shard files a `dataset.source.webdataset` pattern names: brace ranges and lists, globs.

Stdlib only: `recipe validate` checks the pattern against the disk, and the dataset stage reads these files.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe

_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
MAX_SHARDS = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """`shards/{000..002}.tar` -> shards/000.tar, shards/001.tar, shards/002.tar (zero padding kept, as
    braceexpand and the webdataset library do); `{a,b}` lists too, and several of either, the leftmost
    varying slowest (as bash orders them)."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    head, tail = pattern[: m.start()], pattern[m.end() :]
    if m.re is _LIST:
        return [x for part in m.group(1).split(",") for x in expand_braces(head + part + tail)]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    lo, hi = int(a), int(b)
    if abs(hi - lo) >= MAX_SHARDS:
        raise UserError(f"dataset.source.webdataset: {m.group(0)} names over {MAX_SHARDS:,} shards")
    step = 1 if hi >= lo else -1
    return [x for i in range(lo, hi + step, step) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]


def shard_files(loaded: LoadedRecipe) -> list[Path]:
    """The shards `dataset.source.webdataset` names, absolute, in pattern order (globs sorted); a pattern
    that matches no file, or names files that are missing, is a UserError."""
    pattern = loaded.recipe.dataset.source.webdataset
    assert pattern is not None
    names = [str(loaded.resolve(p)) for p in expand_braces(pattern)]
    files: list[Path] = []
    missing: list[str] = []
    for name in names:
        if glob.has_magic(name):
            files += [Path(f) for f in sorted(glob.glob(name)) if Path(f).is_file()]
        elif Path(name).is_file():
            files.append(Path(name))
        else:
            missing.append(name)
    if missing and (files or len(names) > 1):
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"dataset.source.webdataset: {len(missing)} of the {len(names)} shards {pattern!r} names are "
            f"missing: {shown}",
            hint="fix the brace range to the shards that exist, e.g. {00000..00009} for ten",
        )
    if not files:
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        raise UserError(
            f"dataset.source.webdataset: {pattern!r} matches no file (looked for {where})",
            hint="the pattern is relative to the recipe file; a brace range: shards/{00000..00099}.tar",
        )
    return list(dict.fromkeys(files))
