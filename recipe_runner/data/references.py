"""Files the rows name by path, outside what the source's fingerprint stats: a make-style depfile.

`source_fingerprint` stats the data file(s) and the source folders, not the pictures a jsonl, csv or
parquet names (`img/0001.png` beside it, an absolute path, a metadata.jsonl entry outside its folder).
Which files those are is known only by reading the data, so the build records them with the sha256 of
their bytes in `dataset/referenced_files.json` (its digest in report.json), hashed before they are read;
a later build or `recipe plan` checks the recorded list again, parsing no data, and rebuilds when a
file's content changed, or it appeared or disappeared. A touched file (same bytes) is unchanged; the
hashes come from the stat-keyed memo (`file_hashes.py`), so an unchanged file is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from recipe_runner.data import file_hashes

FILE_NAME = "referenced_files.json"
REMOTE = ("http://", "https://", "hf://")


def local_path(value: str, base_dir: str | None) -> Path | None:
    """The file a path cell names, resolved as `open_image` opens it; None for a URL."""
    if value.startswith(REMOTE):
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() or not base_dir else Path(base_dir) / path


def referenced_paths(table: Any, columns: Iterable[str], rows: Sequence[int], base_column: str) -> list[Path]:
    """The files that `rows` of the arrow `table` name in `columns` (path strings, or image structs whose
    bytes are empty), absolute, once each, in row order. Embedded image bytes are never materialised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    take = pa.array(rows, pa.int64())
    if base_column in table.column_names:
        bases = pc.take(table.column(base_column), take).to_pylist()
    else:
        bases = [None] * len(take)
    found: dict[Path, None] = {}
    for name in columns:
        paths = _path_strings(table.column(name))
        if paths is None:
            continue
        for value, base in zip(pc.take(paths, take).to_pylist(), bases, strict=True):
            if value and (path := local_path(value, base)) is not None:
                found.setdefault(path.absolute())  # not resolve(): the same spelling as the covered set
    return list(found)


def _path_strings(column: Any) -> Any:
    """The column's file names as a string array (null where the image is embedded), or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def text(t: Any) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    kind = column.type
    if not pa.types.is_struct(kind):
        return column if text(kind) else None
    if kind.get_field_index("path") < 0 or not text(kind.field("path").type):
        return None
    paths = pc.struct_field(column, "path")  # a view of the child array: the bytes child is not copied
    if kind.get_field_index("bytes") >= 0:
        data_type = kind.field("bytes").type
        if text(data_type) or pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
            lengths = pc.binary_length(pc.struct_field(column, "bytes"))  # reads offsets only
            embedded = pc.fill_null(pc.greater(lengths, 0), False)
            paths = pc.if_else(embedded, pa.scalar(None, paths.type), paths)
    return paths


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def record(dataset_dir: Path, paths: Iterable[Path], covered: Collection[str]) -> dict:
    """Hash `paths` (less those in `covered`) into dataset_dir/referenced_files.json; the summary for
    report.json. A file missing now is recorded too, so that adding it later rebuilds."""
    files = []
    with file_hashes.memo() as hashes:
        for path in sorted(paths):  # by path: the same record whatever the shuffle, easy to read
            if str(path) in covered:
                continue
            st = _stat(str(path))
            entry = {"path": str(path), "size": None, "mtime_ns": None, "sha256": None}
            if st is not None:  # size and mtime for people reading the file; the content decides
                entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashes.sha256(path))
            files.append(entry)
    if not files:
        return {"count": 0}
    raw = json.dumps({"files": files}, indent=1, ensure_ascii=False).encode() + b"\n"
    (dataset_dir / FILE_NAME).write_bytes(raw)  # inside the build's temporary folder: atomic with it
    return {"count": len(files), "sha256": hashlib.sha256(raw).hexdigest()}


def changed(dataset_dir: Path, summary: dict, shown_from: Path) -> str | None:
    """Why the built rows are stale because a file they were read from is not as recorded; None when
    every recorded file has the same content (whatever its mtime), or none was recorded."""
    if not summary.get("count"):
        return None
    try:
        raw = (dataset_dir / FILE_NAME).read_bytes()
        files = json.loads(raw)["files"]
        hashed = all(f["size"] is None or "sha256" in f for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return f"the list of files the data refers to ({FILE_NAME}) is missing or unreadable"
    if hashlib.sha256(raw).hexdigest() != summary.get("sha256"):
        return f"the list of files the data refers to ({FILE_NAME}) does not match report.json"
    if not hashed:  # written by a version that kept sizes and mtimes only: rebuilt once, then by content
        return f"the list of files the data refers to ({FILE_NAME}) predates content hashes"
    stale = []
    with file_hashes.memo() as hashes:
        for f in files:
            exists = _stat(f["path"]) is not None
            if f["size"] is None:  # missing at the last build: stale once it appears
                if exists:
                    stale.append(f)
            elif not exists or hashes.sha256(f["path"]) != f["sha256"]:
                stale.append(f)
    if not stale:
        return None
    first = stale[0]
    gone, new = _stat(first["path"]) is None, first["size"] is None
    now = ", now missing" if gone and not new else ", missing at the last build" if new and not gone else ""
    return (
        f"{len(stale)} of {len(files)} files the data refers to changed "
        f"(e.g. {_shown(first['path'], shown_from)}{now})"
    )


def _shown(path: str, base_dir: Path) -> str:
    """The path as a user would type it from the recipe's folder (absolute when outside it)."""
    path = os.path.normpath(path)
    try:
        return Path(path).relative_to(Path(base_dir).absolute()).as_posix()
    except ValueError:
        return path
