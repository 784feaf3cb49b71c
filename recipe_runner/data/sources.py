"""Where the rows come from: a hub dataset, a local image folder, data files, or a builtin generator.

Every source becomes one `datasets.Dataset` of raw rows plus two bookkeeping columns: `__row__` (the
row's index in the source, which seeds its random crop and names it in reports) and, for local files,
`__base_dir__` (the folder that relative paths in the row resolve against). Image columns are not
decoded here; `process.py` opens them row by row so that one bad file drops one row, not the build.

`datasets` is imported inside the functions that load data: `source_fingerprint` stats files (and hashes
those the memo does not know) and is called by `recipe plan`, which must stay fast.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_runner.data import file_hashes
from recipe_runner.data.file_hashes import FileHashes
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe

ROW, BASE_DIR = "__row__", "__base_dir__"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".tga", ".ppm", ".pgm"}
)
DATA_EXTENSIONS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".arrow": "arrow",
}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
BUILTIN_COLUMNS = {
    "shapes": ("image", "conditioning_image", "prompt", "mask", "shape", "color", "background")
}
_BUILDERS = {"parquet": "parquet", "jsonl": "json", "csv": "csv", "arrow": "arrow"}
_OFFLINE_HINT = (
    "download it once where the hub is reachable (e.g. `ds.save_to_disk('data/my-set')` or "
    "`ds.to_parquet('data/my-set.parquet')`) and point `dataset.source.path:` at the copy, "
    "which works offline"
)


@dataclass
class SourceData:
    dataset: Any
    """`datasets.Dataset`: the source's columns plus `__row__` (and `__base_dir__` for local files)."""
    description: str
    """The source in a user's words, for messages: "image folder data/faces"."""
    columns: list[str]
    """Columns a recipe may name in `dataset.columns` and prompt templates."""
    builtin: str | None = None
    """For a builtin source, rows are generated from `__row__` while processing."""


def load_source(loaded: LoadedRecipe, work_dir: Path) -> SourceData:
    """The recipe's source as raw rows; datasets' cache files go under `work_dir` (hub downloads excepted)."""
    src = loaded.recipe.dataset.source
    if src.builtin is not None:
        import datasets

        n = src.num_samples
        ds = datasets.Dataset.from_dict({ROW: list(range(n))})
        return SourceData(
            ds, f"builtin {src.builtin} ({n} rows)", list(BUILTIN_COLUMNS[src.builtin]), src.builtin
        )
    if src.hub is not None:
        data = hub_source(src.hub, src.config, src.split, src.revision)
    else:
        data = _local(loaded, work_dir)
    if len(data.dataset) == 0:
        raise UserError(f"dataset.source: {data.description} has no rows", hint="check the file or folder")
    data.dataset = data.dataset.add_column(ROW, list(range(len(data.dataset))))
    return data


def hub_source(
    repo: str, config: str | None, split: str, revision: str | None, *, streaming: bool = False
) -> SourceData:
    """A hub dataset's split, downloaded (a `datasets.Dataset`) or streamed (an `IterableDataset`)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = f"hub dataset {repo}" + (f" ({config})" if config else "") + (f"@{revision}" if revision else "")
    try:
        ds = datasets.load_dataset(repo, name=config, split=split, revision=revision, streaming=streaming)
    except (ConnectionError, DatasetNotFoundError) as e:
        raise UserError(
            f"dataset.source.hub: {where} could not be reached ({e})", hint=_OFFLINE_HINT
        ) from None
    except Exception as e:  # bad split/config names and the like; the library's message says which
        raise UserError(f"dataset.source.hub: could not load {where}: {e}", hint=_OFFLINE_HINT) from None
    columns = list(ds.column_names or (ds.features or {}))  # a stream may know its columns only once read
    return SourceData(ds, f"{where} split {split!r}", columns)


def _local(loaded: LoadedRecipe, work_dir: Path) -> SourceData:
    src = loaded.recipe.dataset.source
    root = loaded.resolve(src.path)
    if not root.exists():
        raise UserError(f"dataset.source.path: {src.path!r} not found (looked at {root})")
    fmt = detect_format(root, src.format)
    if src.conditioning_dir is not None and fmt != "imagefolder":
        raise UserError(
            f"dataset.source.conditioning_dir works with image folders only, but {src.path!r} is {fmt}",
            hint="put the conditioning images (or their paths) in a column and name it in "
            "dataset.columns.conditioning_image",
        )
    if fmt == "imagefolder":
        cond_col = loaded.recipe.dataset.columns.conditioning_image or "conditioning_image"
        cond_dir = loaded.resolve(src.conditioning_dir) if src.conditioning_dir else None
        return _image_folder(root, cond_dir, cond_col, work_dir)
    return _data_files(root, fmt, work_dir)


def detect_format(root: Path, fmt: str) -> str:
    """The format of `path`: as given, or guessed from the file extension or the folder's content."""
    if root.is_file():
        if fmt == "imagefolder":
            raise UserError(f"dataset.source: format imagefolder needs a folder, but {root} is a file")
        guess = DATA_EXTENSIONS.get(root.suffix.lower())
        if fmt == "auto" and guess is None:
            raise UserError(
                f"dataset.source.path: cannot tell the format of {root.name} from its extension",
                hint="set dataset.source.format to one of parquet, jsonl, csv, arrow",
            )
        return guess if fmt == "auto" else fmt
    if fmt != "auto":
        return fmt
    if any((root / name).is_file() for name in METADATA_FILES):
        return "imagefolder"
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return "arrow"  # a folder written by `save_to_disk`
    files = list(walk(root))
    found = sorted({DATA_EXTENSIONS[p.suffix.lower()] for p in files if p.suffix.lower() in DATA_EXTENSIONS})
    if len(found) > 1:
        raise UserError(
            f"dataset.source.path: {root} holds {' and '.join(found)} files; cannot tell which to read",
            hint="set dataset.source.format, or keep one kind of data file in the folder",
        )
    if found:
        return found[0]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        return "imagefolder"
    raise UserError(
        f"dataset.source.path: no images or data files in {root}",
        hint="expected images (with metadata.jsonl or metadata.csv), or parquet/jsonl/csv/arrow files",
    )


def _load(builder: str, files: list[Path], work_dir: Path) -> Any:
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"dataset.source: {f} is empty")
    # Invalid UTF-8 in captions becomes U+FFFD (counted per row later) instead of failing the load. The
    # json reader applies `encoding_errors` only to encodings other than "utf-8", hence "utf-8-sig".
    extra = {
        "csv": {"encoding_errors": "replace"},
        "json": {"encoding": "utf-8-sig", "encoding_errors": "replace"},
    }
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(work_dir / "hf"),
            **extra.get(builder, {}),
        )
    except Exception as e:  # malformed files: the library's message (or its cause) says what is wrong
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # a CSV with a header and no rows
            raise UserError(
                f"dataset.source: {files[0] if len(files) == 1 else files[0].parent} has no rows"
            ) from None
        names = files[0].name if len(files) == 1 else f"{len(files)} {builder} files in {files[0].parent}"
        raise UserError(f"dataset.source: could not read {names}: {cause}") from None


def _data_files(root: Path, fmt: str, work_dir: Path) -> SourceData:
    import datasets

    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        return _saved(root)
    exts = {e for e, f in DATA_EXTENSIONS.items() if f == fmt}
    files = [root] if root.is_file() else [p for p in walk(root) if p.suffix.lower() in exts]
    if not files:
        raise UserError(f"dataset.source.path: no {fmt} files in {root}")
    # Paths in a file resolve against that file's folder, so each folder of files is loaded on its own.
    parts = []
    for parent in sorted({f.parent for f in files}):
        ds = _load(_BUILDERS[fmt], [f for f in files if f.parent == parent], work_dir)
        parts.append(ds.add_column(BASE_DIR, [str(parent)] * len(ds)))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    what = f"{fmt} file {root.name}" if root.is_file() else f"{len(files)} {fmt} file(s) in {root}"
    return SourceData(ds, what, [c for c in ds.column_names if c != BASE_DIR])


def _saved(root: Path) -> SourceData:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:
        raise UserError(f"dataset.source: could not read the saved dataset in {root}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise UserError(f"dataset.source: {root} has splits {', '.join(ds)} and none is 'train'")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return SourceData(
        ds.add_column(BASE_DIR, [str(root)] * len(ds)), f"saved dataset {root}", ds.column_names
    )


def _image_folder(root: Path, cond_dir: Path | None, cond_col: str, work_dir: Path) -> SourceData:
    import datasets

    metas = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(metas) > 1:
        raise UserError(f"dataset.source.path: {root} has {' and '.join(m.name for m in metas)}; keep one")
    if metas:
        meta = metas[0]
        ds = _load(_BUILDERS[DATA_EXTENSIONS[meta.suffix]], [meta], work_dir)
        if "file_name" not in ds.column_names:
            raise UserError(
                f"{meta}: no file_name column (columns: {', '.join(ds.column_names)})",
                hint='each row names its image relative to the folder, e.g. {"file_name": "0001.png", ...}',
            )
        if "image" in ds.column_names:
            raise UserError(f"{meta}: has both file_name and image columns; file_name becomes `image`")
        ds = ds.rename_column("file_name", "image")  # as datasets' own imagefolder loader does
        what = f"image folder {root} ({meta.name})"
    else:
        skip = cond_dir.resolve() if cond_dir else None
        files = list(walk(root))
        images = [
            p
            for p in files
            if p.suffix.lower() in IMAGE_EXTENSIONS and not (skip and p.resolve().is_relative_to(skip))
        ]
        if not images:
            raise UserError(f"dataset.source.path: no images in {root}")
        rel = [p.relative_to(root).as_posix() for p in images]
        data: dict[str, list] = {"image": rel}
        if any("/" in r for r in rel):  # images in sub-folders: the folder name is a label, as in imagefolder
            data["label"] = [r.rsplit("/", 2)[-2] if "/" in r else "" for r in rel]
        what = f"image folder {root}"
        captions = _sidecar_captions(images, set(files))
        found = sum(c is not None for c in captions)
        if found:
            data["prompt"] = captions
            n = len(images) - found
            missing = f"; {n} image{'s' * (n > 1)} without one: empty prompt{'s' * (n > 1)}" if n else ""
            what += f" (captions from {found} of {len(images)} .txt/.caption files{missing})"
        ds = datasets.Dataset.from_dict(data)
    if cond_dir is not None:
        if cond_col in ds.column_names:
            raise UserError(
                f"dataset.source: both conditioning_dir and a {cond_col!r} column in {root}; keep one"
            )
        names = ds.data.column("image").to_pylist()
        ds = ds.add_column(cond_col, [str(cond_dir / str(n)) if n is not None else None for n in names])
    ds = ds.add_column(BASE_DIR, [str(root)] * len(ds))
    return SourceData(ds, what, [c for c in ds.column_names if c != BASE_DIR])


# Captions beside the images, NAME.txt (or NAME.caption) for NAME.png: the layout kohya's sd-scripts,
# SimpleTuner and ai-toolkit read, so a folder prepared for them trains here unchanged.
CAPTION_EXTENSIONS = (".txt", ".caption")


def _sidecar_captions(images: list[Path], files: set[Path]) -> list[str | None]:
    """Each image's sidecar caption, stripped (invalid UTF-8 replaced, and counted later); None where the
    image has none."""
    out: list[str | None] = []
    for image in images:
        sidecar = next((f for ext in CAPTION_EXTENSIONS if (f := image.with_suffix(ext)) in files), None)
        out.append(sidecar.read_bytes().decode("utf-8", errors="replace").strip() if sidecar else None)
    return out


def walk(root: Path) -> Iterator[Path]:
    """Files under `root` in a stable order, skipping hidden files and folders (.git, .DS_Store, ...)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _files_digest(root: Path, hashes: FileHashes) -> dict:
    """Identity of a file or folder by content: each file's relative path and sha256. A file whose stat
    the memo knows is not read, so a touched file (same bytes) keeps the key and plan stays fast."""
    if not root.exists():
        return {"missing": str(root)}
    files = [root] if root.is_file() else list(walk(root))
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{hashes.sha256(f) or 'unreadable'}\n".encode())
    return {"files": len(files), "sha256": h.hexdigest()}


def fingerprinted_files(loaded: LoadedRecipe) -> set[str]:
    """The files `source_fingerprint` hashes one by one (those under a source folder or conditioning_dir),
    as absolute paths: a row naming one of them needs no record of its own in `references.py`."""
    src = loaded.recipe.dataset.source
    roots = [loaded.resolve(p) for p in (src.path, src.conditioning_dir) if p is not None]
    return {str(f.absolute()) for root in roots if root.is_dir() for f in walk(root)}


def source_fingerprint(loaded: LoadedRecipe) -> dict:
    """What identifies the source's content (the cache key uses this): the data file(s) or folder and
    `conditioning_dir`, each file by path and the sha256 of its bytes, read only when the memo
    (`file_hashes.py`) does not know the file's stat, so that `recipe plan` reads no data when warm.

    Files the rows name by path outside those (`img/0001.png` beside a jsonl, absolute paths) are known
    only after reading the data: the build records them and the cache checks them (`references.py`).
    """
    src = loaded.recipe.dataset.source
    if src.hub is not None:
        fp = {"hub": src.hub, "split": src.split, "config": src.config, "revision": src.revision}
        if src.streaming:  # the training order depends on the buffer (absent: keys of built hub data stay)
            fp.update(streaming=True, shuffle_buffer=src.shuffle_buffer)
        return fp
    if src.webdataset is not None:
        from recipe_runner.data.shards import shards_fingerprint

        return {**shards_fingerprint(loaded), "shuffle_buffer": src.shuffle_buffer}
    if src.builtin is not None:
        # The generator's code is part of the data: a change to it must rebuild.
        code = hashlib.sha256(Path(__file__).with_name(f"builtin_{src.builtin}.py").read_bytes()).hexdigest()
        return {"builtin": src.builtin, "num_samples": src.num_samples, "code": code[:16]}
    with file_hashes.memo() as hashes:
        fp: dict = {
            "path": src.path,
            "format": src.format,
            "content": _files_digest(loaded.resolve(src.path), hashes),
        }
        if src.conditioning_dir is not None:
            fp["conditioning_dir"] = src.conditioning_dir
            fp["conditioning_content"] = _files_digest(loaded.resolve(src.conditioning_dir), hashes)
    return fp
