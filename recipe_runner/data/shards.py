"""WebDataset shards on disk: the pattern's files, their fingerprint, and the keys their samples hold.

Stdlib only (tarfile, glob), so that `recipe validate`, `plan` and the cache key read shard names and tar
headers without importing datasets. A WebDataset sample is the run of tar members sharing one name before
the first dot: `0001.png` + `0001.txt` is sample `0001` with the columns `png` and `txt` (datasets'
webdataset loader names them the same way).
"""

from __future__ import annotations

import glob
import hashlib
import re
import tarfile
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe

_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
MAX_SHARDS = 1_000_000
_SAMPLE_KEYS = 64  # tar members read at most to find a shard's first sample
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # (sample key, column), as datasets' webdataset splits


def expand_braces(pattern: str) -> list[str]:
    """`shards/{000..002}.tar` -> shards/000.tar, shards/001.tar, shards/002.tar (zero padding kept, as
    braceexpand and the webdataset library do); `{a,b}` lists too, nested and repeated, in order."""
    if m := _RANGE.search(pattern):
        a, b = m.group(1), m.group(2)
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= MAX_SHARDS:
            raise UserError(f"dataset.source.webdataset: {m.group(0)} names over {MAX_SHARDS:,} shards")
        step = 1 if hi >= lo else -1
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [x for i in range(lo, hi + step, step) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]
    if m := _LIST.search(pattern):
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [x for part in m.group(1).split(",") for x in expand_braces(head + part + tail)]
    return [pattern]


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


def shards_fingerprint(loaded: LoadedRecipe) -> dict:
    """The shards by name, size and modification time: hashing every shard's bytes would read the whole
    dataset at every `recipe plan` (the data may be larger than anyone wants to read twice)."""
    pattern = loaded.recipe.dataset.source.webdataset
    try:
        files = shard_files(loaded)
    except UserError as e:
        return {"webdataset": pattern, "missing": e.message}
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"webdataset": pattern, "shards": len(files), "stat": h.hexdigest()}


def first_sample_keys(shard: Path) -> tuple[str, list[str]]:
    """(key, columns) of a shard's first sample, from its first tar headers."""
    try:
        with tarfile.open(shard, "r|*") as tar:  # a stream: reads headers in order, no index of the whole
            key, columns = None, []
            for i, member in enumerate(tar):
                if i >= _SAMPLE_KEYS:
                    break
                if not member.isfile():
                    continue
                m = _MEMBER.match(member.name)
                if m is None:
                    continue
                base, ext = m.groups()
                if key is not None and base != key:
                    break
                key = base
                columns.append(ext)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"dataset.source.webdataset: {shard} is not a readable tar file ({e})") from None
    if key is None:
        raise UserError(f"dataset.source.webdataset: {shard} holds no samples (no NAME.EXT members)")
    return key, columns


def check_shard_columns(files: list[Path], wanted: dict[str, str]) -> None:
    """Every shard's first sample has each wanted column ({recipe field: column}); else a UserError naming
    the shard, the sample and the columns it has."""
    for shard in files:
        key, columns = first_sample_keys(shard)
        for field, column in wanted.items():
            if column not in columns:
                raise UserError(
                    f"{field}: no {column!r} in shard {shard} (its first sample {key!r} has "
                    f"{', '.join(columns)})",
                    hint="a WebDataset sample NAME.EXT becomes the column EXT: map dataset.columns to one of "
                    "those, e.g. {image: jpg, prompt: txt}",
                )
