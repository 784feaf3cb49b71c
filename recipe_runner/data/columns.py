"""The column names a recipe gives, checked against a local source's header at `recipe validate` time.

The build (`data/process.py` `row_plan`) stops on a misspelt column only after loading the data; here the
same names are checked by reading only a header: a jsonl's first row, a csv's header line, a parquet
footer, an arrow schema, a saved dataset's dataset_info.json, an image folder's metadata file plus the
columns its loader adds (`data/sources.py`). A name is reported only when the source cannot have it,
so that every recipe the build accepts stays valid; whatever cannot be read cheaply is skipped, and the
build reports it. No torch and no `datasets`; pyarrow only for parquet and arrow files, when needed.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recipe_runner.data import sources
from recipe_runner.errors import Problem
from recipe_runner.recipe.checks import problem_at
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.yaml_io import Path_

_MAX_LINE = 16 << 20  # a jsonl's first row may embed an image; longer than this: not read
_MAX_SCAN = 64 << 20  # a jsonl searched for a key missing from its first row; larger files: skipped
_MAX_FOLDERS = 64  # a data folder's sub-folders whose first file is read (each is loaded on its own)
_MAX_FILES = 200_000  # a folder walked to tell its format, label and prompt columns (~1 s); larger: skipped
_FILE_NAME_NOTE = "an image folder's metadata `file_name` column becomes the `image` column"


@dataclass
class _Header:
    names: list[str]
    """Columns the source certainly has (shown in the message)."""
    where: str
    """The source in the user's words, as the build names it."""
    may_have: Callable[[str], bool] = lambda name: False
    """Whether a name not in `names` might still be a column (a jsonl key missing from the first row)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Hints for names the loader renames."""


def check_columns(loaded: LoadedRecipe) -> list[Problem]:
    """A located problem for each column the recipe names that its local or builtin source lacks."""

    named = _named(loaded)
    try:
        header = _header(loaded, {name for _, name, _ in named})
    except Exception:  # an unreadable or odd file: the build reads it and says what is wrong
        return []
    if header is None:
        return []
    problems = []
    for path, name, label in named:
        if name in header.names or header.may_have(name):
            continue
        close = difflib.get_close_matches(name, header.names, n=1, cutoff=0.6)
        hint = header.notes.get(name) or (
            f"did you mean {close[0]!r}?" if close else "name one of the columns above"
        )
        shown = ", ".join(header.names)
        problems.append(
            problem_at(loaded, path, f"{label}no column {name!r} in {header.where} (columns: {shown})", hint)
        )
    return problems


def _template_fields(template: str) -> list[str] | None:
    """The columns a prompt template names, as `data.process.template_fields` parses them (that module
    imports numpy and PIL); None for a malformed template, which the build reports."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        name = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not name or name.isdigit():
            return None
        names.append(name)
    return names


def _named(loaded: LoadedRecipe) -> list[tuple[Path_, str, str]]:
    """(field, column, message prefix) for each column the build will look up, as `row_plan` does."""
    spec = loaded.recipe.dataset
    out: list[tuple[Path_, str, str]] = [(("dataset", "columns", "image"), spec.columns.image, "")]
    if spec.columns.conditioning_image is not None:
        out.append((("dataset", "columns", "conditioning_image"), spec.columns.conditioning_image, ""))
    if spec.prompt is not None:
        for name in dict.fromkeys(_template_fields(spec.prompt) or []):
            out.append((("dataset", "prompt"), name, f"placeholder {{{name}}}: "))
    elif spec.columns.prompt is not None:
        out.append((("dataset", "columns", "prompt"), spec.columns.prompt, ""))
    return out


def _header(loaded: LoadedRecipe, wanted: set[str]) -> _Header | None:
    """The source's columns as the build will see them; None where they cannot be told cheaply."""
    src = loaded.recipe.dataset.source
    if src.builtin is not None:
        return _Header(list(sources.BUILTIN_COLUMNS[src.builtin]), f"builtin {src.builtin}")
    if src.path is None:  # a hub dataset: its columns are known only by downloading it
        return None
    root = loaded.resolve(src.path)
    if not root.exists():  # check_inputs reports it
        return None
    scan = None
    if root.is_dir() and src.format == "auto" and not _marked(root):
        scan = _scan(root)  # the walk `detect_format` would do, once, for the columns below too
        fmt = _format_of(scan)
        if fmt is None:
            return None  # no images or data files, or several kinds: the build stops on these
    else:
        fmt = sources.detect_format(root, src.format)  # raises UserError where the build would too
    if src.conditioning_dir is not None and fmt != "imagefolder":
        return None  # the build stops on this before it looks at columns
    if root.is_file():
        found = _file_columns(root, fmt)
        return None if found is None else _Header(found[0], f"{fmt} file {src.path}", found[1])
    if fmt == "imagefolder":
        cond_dir = loaded.resolve(src.conditioning_dir) if src.conditioning_dir else None
        cond_col = loaded.recipe.dataset.columns.conditioning_image or "conditioning_image"
        return _image_folder(root, src.path, cond_dir, cond_col, wanted, scan)
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        names = _saved_columns(root)
        return None if names is None else _Header(names, f"saved dataset {src.path}")
    return _data_folder(root, src.path, fmt, scan or _scan(root))


def _marked(root: Path) -> bool:
    """Whether `detect_format` tells the folder's format from a marker file, without walking it."""

    markers = (*sources.METADATA_FILES, "state.json", "dataset_dict.json")
    return any((root / name).is_file() for name in markers)


def _scan(root: Path) -> list[tuple[str, list[str]]]:
    """(folder, file names) as `sources.walk` visits them (hidden ones skipped, sorted), as strings: a
    large image folder is walked once, without a Path per file. Raises _TooMany past _MAX_FILES."""
    out, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.append((dirpath, sorted(n for n in filenames if not n.startswith("."))))
        seen += len(filenames)
        if seen > _MAX_FILES:
            raise _TooMany
    return out


class _TooMany(Exception):
    """A folder too large to walk at validate time: its columns are left to the build."""


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _format_of(scan: list[tuple[str, list[str]]]) -> str | None:
    """`detect_format` for a folder without marker files: its one kind of data file, else images."""

    exts = {_ext(n) for _, names in scan for n in names}
    kinds = {sources.DATA_EXTENSIONS[e] for e in exts if e in sources.DATA_EXTENSIONS}
    if len(kinds) == 1:
        return kinds.pop()
    return "imagefolder" if not kinds and exts & sources.IMAGE_EXTENSIONS else None


def _file_columns(path: Path, fmt: str) -> tuple[list[str], Callable[[str], bool]] | None:
    """(columns, may_have) of one data file, read as the build's loader for `fmt` reads it."""
    if fmt == "jsonl":
        return _jsonl_columns(path)
    if fmt == "csv":
        names = _csv_columns(path)
    elif fmt == "parquet":
        import pyarrow.parquet as pq  # the footer only

        names = list(pq.read_schema(path).names)
    elif fmt == "arrow":
        names = _arrow_columns(path)
    else:
        return None
    return (names, lambda name: False) if names is not None else None


def _jsonl_columns(path: Path) -> tuple[list[str], Callable[[str], bool]] | None:
    """The first row's keys; a key of a later row only is possible, so a name missing from the first row
    is reported only when it appears nowhere in the file."""
    with open(path, "rb") as f:
        line = f.readline(_MAX_LINE).removeprefix(b"\xef\xbb\xbf")  # the loader reads utf-8-sig
        while line and not line.strip():
            line = f.readline(_MAX_LINE)
    try:
        row = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:  # a JSON array, a pretty-printed object, an over-long line: not told cheaply
        return None
    if not isinstance(row, dict):
        return None
    return list(row), lambda name: _mentions(path, name)


def _mentions(path: Path, name: str) -> bool:
    """Whether `name` might be a key somewhere in the JSON file (True when the file is too large to
    search): a key is written as a JSON string, raw or with ASCII escapes."""
    if path.stat().st_size > _MAX_SCAN:
        return True
    needles = {json.dumps(name), json.dumps(name, ensure_ascii=False), json.dumps(name).replace("/", "\\/")}
    data = path.read_bytes()
    return any(n.encode("utf-8", errors="surrogatepass") in data for n in needles)


def _csv_columns(path: Path) -> list[str] | None:
    """The header as pandas reads it (the first line that is not blank); None when pandas would rename
    a cell (empty: "Unnamed: 2", repeated: "a.1")."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next((row for row in csv.reader(f) if any(cell.strip() for cell in row)), None)
    if not header or "" in header or len(set(header)) != len(header):
        return None
    return header


def _arrow_columns(path: Path) -> list[str]:
    """An arrow file's schema (stream format, as datasets writes it, or file format)."""
    import pyarrow as pa

    with open(path, "rb") as f:
        try:
            return list(pa.ipc.open_stream(f).schema.names)
        except pa.ArrowInvalid:
            f.seek(0)
            return list(pa.ipc.open_file(f).schema.names)


def _saved_columns(root: Path) -> list[str] | None:
    """A `save_to_disk` folder's columns, as `datasets.load_from_disk` and the build pick its split."""
    if (root / "dataset_info.json").is_file() and (root / "state.json").is_file():
        folder = root
    elif (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if "train" not in splits and len(splits) != 1:
            return None  # the build stops: no 'train' split
        folder = root / ("train" if "train" in splits else splits[0])
    else:
        return None
    features = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8")).get("features")
    if isinstance(features, dict) and features:
        return list(features)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return _arrow_columns(folder / state["_data_files"][0]["filename"])


def _data_folder(root: Path, shown: str, fmt: str, scan: list[tuple[str, list[str]]]) -> _Header | None:
    """A folder of data files: each sub-folder's files are loaded together (the first file's columns,
    later ones must match) and the sub-folders concatenated (the union of their columns)."""

    exts = {e for e, f in sources.DATA_EXTENSIONS.items() if f == fmt}
    groups = [(d, [n for n in names if _ext(n) in exts]) for d, names in scan]
    groups = [(d, names) for d, names in groups if names]
    if not groups or len(groups) > _MAX_FOLDERS:
        return None
    names: dict[str, None] = {}
    checks = []
    for folder, files in groups:
        found = _file_columns(Path(folder) / files[0], fmt)
        if found is None:
            return None
        names.update(dict.fromkeys(found[0]))
        checks.append(found[1])
    n = sum(len(files) for _, files in groups)
    return _Header(list(names), f"{n} {fmt} file(s) in {shown}", lambda name: any(c(name) for c in checks))


def _image_folder(
    root: Path,
    shown: str,
    cond_dir: Path | None,
    cond_col: str,
    wanted: set[str],
    scan: list[tuple[str, list[str]]] | None,
) -> _Header | None:
    """An image folder's columns: its metadata file's (file_name becoming `image`), or `image` plus
    `label` (images in sub-folders) and `prompt` (sidecar captions); and the conditioning_dir column."""

    metas = [root / name for name in sources.METADATA_FILES if (root / name).is_file()]
    if len(metas) > 1:
        return None  # the build stops: keep one
    notes: dict[str, str] = {}
    may_have: Callable[[str], bool] = lambda name: False  # noqa: E731
    if metas:
        found = _file_columns(metas[0], sources.DATA_EXTENSIONS[metas[0].suffix])
        if found is None or "file_name" not in found[0] or "image" in found[0]:
            return None  # the build stops on these with its own message
        names = ["image" if c == "file_name" else c for c in found[0]]
        may_have = lambda name: name != "file_name" and found[1](name)  # noqa: E731
        notes["file_name"] = _FILE_NAME_NOTE
        where = f"image folder {shown} ({metas[0].name})"
    else:
        names, where = ["image"], f"image folder {shown}"
        if wanted - {"image", cond_col}:  # the folder is walked only to tell label and prompt
            extra = _loader_columns(root, cond_dir, scan or _scan(root))
            if extra is None:
                return None  # the build stops: no images
            names += extra
    if cond_dir is not None:
        if cond_col in names:
            return None  # the build stops: both conditioning_dir and the column
        names.append(cond_col)
    return _Header(names, where, may_have, notes)


def _loader_columns(root: Path, cond_dir: Path | None, scan: list[tuple[str, list[str]]]) -> list[str] | None:
    """The columns `sources._image_folder` adds to `image` without a metadata file: `label` when an image
    is in a sub-folder, `prompt` when an image has a sidecar caption; None when there is no image (the
    images under conditioning_dir are not the folder's)."""

    skip = os.path.realpath(cond_dir) if cond_dir else None
    label = prompt = found = False
    for folder, files in scan:
        real = os.path.realpath(folder) if skip else ""
        present = set(files)
        for name in files:
            if _ext(name) not in sources.IMAGE_EXTENSIONS:
                continue
            if skip:  # as the build resolves each image (a linked file resolves to its target)
                path = os.path.join(folder, name)
                where = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, name)
                if where == skip or where.startswith(skip.rstrip(os.sep) + os.sep):
                    continue
            found = True
            label = label or folder != str(root)
            stem = os.path.splitext(name)[0]
            prompt = prompt or any(stem + ext in present for ext in sources.CAPTION_EXTENSIONS)
    if not found:
        return None
    return ["label"] * label + ["prompt"] * prompt
