"""WebDataset shards on disk: their fingerprint, and the columns their samples hold.

Stdlib only (tarfile), so that `recipe plan` and the cache key read shard stats and tar headers without
importing datasets (the files a pattern names: recipe/shards.py). A WebDataset sample is the run of tar
members sharing one name before the first dot: `0001.png` + `0001.txt` is sample `0001` with the columns
`png` and `txt` (datasets' webdataset loader names them the same way).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.shards import shard_files

_SAMPLE_KEYS = 64  # tar members read at most to find a shard's first sample
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # (sample key, column), as datasets' webdataset splits


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
