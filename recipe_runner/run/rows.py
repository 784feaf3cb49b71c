"""Counting a recipe's source rows without reading the data (parquet metadata, line counts, listings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe


@dataclass
class RowCount:
    rows: int | None
    how: str  # how they were counted, or why they are unknown
    approximate: bool = False

    def to_dict(self) -> dict:
        return {"source_rows": self.rows, "counted_from": self.how, "approximate": self.approximate}


MAX_SCAN_BYTES = 1 << 30  # line-counting more than this would break "well under a second"


def count_rows(loaded: LoadedRecipe) -> RowCount:
    """Rows in the source without reading the data: builtin size, parquet metadata, lines, listings."""
    # data.sources stats files only at import (it is what the dataset stage uses to find them).
    from recipe_runner.data.sources import (
        DATA_EXTENSIONS,
        IMAGE_EXTENSIONS,
        METADATA_FILES,
        detect_format,
        walk,
    )

    src = loaded.recipe.dataset.source
    if src.builtin is not None:
        return RowCount(src.num_samples, f"builtin {src.builtin}: source.num_samples")
    if src.webdataset is not None:
        from recipe_runner.recipe.shards import shard_files

        try:
            n = len(shard_files(loaded))
        except UserError as e:
            return RowCount(None, f"unknown ({e.message})")
        return RowCount(None, f"unknown: streamed from {n} WebDataset shard{'s' * (n > 1)} while training")
    if src.hub is not None and src.streaming:
        return RowCount(None, "unknown: streamed from the hub while training")
    if src.hub is not None:
        return RowCount(None, "unknown until downloaded (hub dataset)")
    root = loaded.resolve(src.path)
    try:
        fmt = detect_format(root, src.format)
    except UserError as e:
        return RowCount(None, f"unknown ({e.message})")
    if fmt == "imagefolder":
        meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
        if meta is None:
            skip = loaded.resolve(src.conditioning_dir).resolve() if src.conditioning_dir else None
            images = [
                p
                for p in walk(root)
                if p.suffix.lower() in IMAGE_EXTENSIONS and not (skip and p.resolve().is_relative_to(skip))
            ]
            return RowCount(len(images), f"images in {root}")
        files, fmt = [meta], DATA_EXTENSIONS[meta.suffix]
    elif root.is_file():
        files = [root]
    elif (root / "dataset_dict.json").is_file():  # save_to_disk of splits: the stage reads `train`
        splits = [p for p in sorted(root.iterdir()) if p.is_dir()]
        split = root / "train" if (root / "train").is_dir() else splits[0] if splits else root
        files = [p for p in walk(split) if p.suffix == ".arrow"]
    else:
        files = [p for p in walk(root) if DATA_EXTENSIONS.get(p.suffix.lower()) == fmt]
    return _count_files(files, fmt)


def _count_files(files: list[Path], fmt: str) -> RowCount:
    what = f"{len(files)} {fmt} file{'s' if len(files) != 1 else ''}"
    if fmt in ("parquet", "arrow"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return RowCount(None, f"unknown (pyarrow is needed to count {fmt} rows)")
        total = 0
        for f in files:
            if fmt == "parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:  # memory-mapped: batch headers are read, column data is not
                with pa.memory_map(str(f)) as source:
                    total += sum(b.num_rows for b in pa.ipc.open_stream(source))
        return RowCount(total, f"{fmt} metadata of {what}")
    if sum(f.stat().st_size for f in files) > MAX_SCAN_BYTES:
        return RowCount(None, f"unknown ({what} over {MAX_SCAN_BYTES >> 30} GB not counted)")
    lines = 0
    for f in files:
        with f.open("rb") as fh:
            tail, data = b"\n", fh.read(1 << 20)
            while data:
                lines += data.count(b"\n")
                tail, data = data, fh.read(1 << 20)
            lines += not tail.endswith(b"\n")  # a last line without a newline
    if fmt == "csv":
        # One header line per file; quoted fields can hold newlines, hence "approximate".
        return RowCount(lines - len(files), f"lines of {what}", approximate=True)
    return RowCount(lines, f"lines of {what}")
