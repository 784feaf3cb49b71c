"""The dataset stage: source rows -> processed rows -> `dataset/` (data/, preview.png, report.json).

The whole `dataset/` folder is written to a temporary sibling and renamed into place, so a failed or
interrupted build leaves the previous dataset (or none) and never half of one. A build is skipped when
`cache_key.dataset_status` says the built one is current: the same cache key, and every file the rows
named by path as the build recorded it (`referenced_files.json`).
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from recipe_runner.data import references
from recipe_runner.data.buckets import (
    bucket_counts,
    image_sizes,
)
from recipe_runner.data.build_progress import build_progress, interrupts_stay_interrupts
from recipe_runner.data.cache_key import (
    DATASET_CODE_VERSION,
    computes_condition,
    current_report,
    dataset_cache_key,
    dataset_status,
    digest,
    key_inputs,
)
from recipe_runner.data.report import check_rows, data_digest, print_summary, report_rows, tally
from recipe_runner.data.sources import BASE_DIR, ROW, SourceData, fingerprinted_files, load_source
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import atomic_dir, write_text
from recipe_runner.runfolder.layout import RunFolder

if TYPE_CHECKING:
    from rich.console import Console

    from recipe_runner.data.process import RowPlan
    from recipe_runner.recipe.dataset import DatasetSpec

# The cache's names stay importable from here, where callers have always found them.
__all__ = [
    "DATASET_CODE_VERSION",
    "build_dataset",
    "computes_condition",
    "dataset_cache_key",
    "dataset_status",
    "key_inputs",
]


def build_dataset(
    loaded: LoadedRecipe, folder: RunFolder, *, console: Console | None = None, force: bool = False
) -> dict:
    """Build the recipe's dataset into `folder.dataset` unless an identical build is there; the report."""
    inputs = key_inputs(loaded)
    old = None if force else current_report(loaded, folder, inputs)[0]
    if old is not None:
        if console is not None:
            console.print(
                f"dataset: unchanged, using {escape(str(folder.dataset))} "
                + ("(streaming: its preview)" if old.get("streaming") else f"({report_rows(old)} rows)"),
                soft_wrap=True,
            )
        return {**old, "cached": True}
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    with atomic_dir(folder.dataset) as tmp:
        report = _build(loaded, tmp, inputs, console, start)
        report["path"] = str(folder.dataset_data)
        write_text(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if console is not None:
        print_summary(console, report, folder, loaded)
    return report


def _build(loaded: LoadedRecipe, tmp: Path, inputs: dict, console: Console | None, start: float) -> dict:
    import datasets

    from recipe_runner.data import preview
    from recipe_runner.data.process import BOOKKEEPING, DROP, FILE, NOTES, RowError, row_plan

    spec, key = loaded.recipe.dataset, digest(inputs)
    if spec.source.streams:
        return _build_stream(loaded, tmp, inputs, start)
    work = tmp / ".work"  # datasets' cache files: on the run folder's disk, removed before the rename
    try:
        source = load_source(loaded, work)
        plan = row_plan(loaded, source)
        condition = None
        if plan.conditioning_column is None:
            from recipe_runner.conditions import build_condition

            condition = build_condition(loaded.recipe.condition, base_dir=loaded.base_dir)
        order = _order(len(source.dataset), spec, plan.seed)
        refs = None
        if spec.source.path is not None:  # hub and builtin sources name no local files
            columns = [c for c in (plan.image_column, plan.conditioning_column) if c is not None]
            paths = references.referenced_paths(source.dataset.data, columns, order, BASE_DIR)
            refs = references.record(tmp, paths, covered=fingerprinted_files(loaded))  # stat before reading
        ds = _prepare(source, plan, order)
        try:
            out = _map(ds, plan, condition, spec, key, work, console)
        except RowError as e:  # raised in a worker; plain args so that it survives the trip back
            raise UserError(f"dataset: {e.args[0]}", hint=e.args[1]) from None
        rows, drops, files, notes = (out.data.column(c).to_pylist() for c in (ROW, DROP, FILE, NOTES))
        kept = [i for i, d in enumerate(drops) if not d]
        dropped = tally(rows, files, drops, notes)  # a dropped row's notes say why in detail
        warnings = tally(rows, files, [n if not d else "" for n, d in zip(notes, drops, strict=True)])
        check_rows(len(kept), len(drops), dropped, spec.holdout, source)
        final = out.select(kept).remove_columns(list(BOOKKEEPING))
        n_train = len(final) - spec.holdout
        splits = {"train": final.select(range(n_train))}
        if spec.holdout:
            splits["holdout"] = final.select(range(n_train, len(final)))
        datasets.DatasetDict(splits).save_to_disk(str(tmp / "data"))
        buckets = bucket_counts(image_sizes(splits["train"])) if spec.buckets.enabled else None
        preview.write_preview(splits["train"], tmp / "preview.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return {
        "cached": False,
        "cache_key": key,
        "key_inputs": inputs,
        "source": source.description,
        "source_fingerprint": digest(inputs["source"]),
        "data_sha256": data_digest(tmp / "data"),
        "referenced_files": refs,
        "columns": _columns(loaded, plan),
        "resolution": spec.resolution,
        **({"buckets": buckets} if buckets is not None else {}),
        "rows_in": len(source.dataset),
        "rows_processed": len(drops),
        "rows_out": {name: len(split) for name, split in splits.items()},
        "rows_dropped": len(drops) - len(kept),
        "dropped": dropped,
        "warnings": warnings,
        "seconds": round(seconds, 3),
        "rows_per_second": round(len(drops) / seconds, 1),
        "num_proc": spec.num_proc,
        "batch_size": spec.batch_size,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _build_stream(loaded: LoadedRecipe, tmp: Path, inputs: dict, start: float) -> dict:
    """A streaming source is not built: its first rows are read for the held-out split (never trained on)
    and a preview (preview.png, default validation conditions); training reads the rest as it goes."""
    import datasets

    from recipe_runner.data import preview
    from recipe_runner.data.images import png
    from recipe_runner.data.process import DROP, FILE, NOTES, ROW
    from recipe_runner.data.stream import first_rows

    spec, key = loaded.recipe.dataset, digest(inputs)
    got = first_rows(loaded, spec.holdout)
    if len(got["holdout"]) < spec.holdout or not got["preview"]:
        found = len(got["holdout"]) + len(got["preview"])
        raise UserError(
            f"dataset: only {found} usable rows at the start of {got['source']} "
            f"(dataset.holdout is {spec.holdout}, and training needs more; {len(got['drops'])} dropped)",
            hint="lower dataset.holdout, or check the shards' first rows",
        )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "prompt": datasets.Value("string"),
        }
    )

    def split(rows: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list(
            [
                {
                    "image": png(r["image"]),
                    "conditioning_image": png(r["conditioning_image"]),
                    "prompt": r["prompt"],
                }
                for r in rows
            ],
            features=features,
        )

    splits = {"preview": split(got["preview"])}
    if spec.holdout:
        splits["holdout"] = split(got["holdout"])
    datasets.DatasetDict(splits).save_to_disk(str(tmp / "data"))
    preview.write_preview(splits["preview"], tmp / "preview.png")
    drops = got["drops"]
    rows, files, reasons, notes = ([d[c] for d in drops] for c in (ROW, FILE, DROP, NOTES))
    plan = got["plan"]
    seconds = time.perf_counter() - start
    data_sha = data_digest(tmp / "data")
    return {
        "cached": False,
        "streaming": True,
        "cache_key": key,
        "key_inputs": inputs,
        "source": got["source"],
        "source_fingerprint": digest(inputs["source"]),
        # Training reads the source itself: its key is the source's (in the cache key) and these rows.
        "data_sha256": digest({"cache_key": key, "rows": data_sha}),
        "referenced_files": None,
        "columns": _columns(loaded, plan),
        "resolution": spec.resolution,
        "rows_in": None,
        "rows_processed": len(got["holdout"]) + len(got["preview"]) + len(drops),
        "rows_out": {"holdout": len(got["holdout"])} if spec.holdout else {},
        "preview_rows": len(got["preview"]),
        "holdout_ids": got["holdout_ids"],
        "rows_dropped": len(drops),
        "dropped": tally(rows, files, reasons, notes),
        "warnings": {},
        "seconds": round(seconds, 3),
        "rows_per_second": round((len(got["holdout"]) + len(got["preview"])) / seconds, 1),
        "num_proc": 1,
        "batch_size": spec.batch_size,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _columns(loaded: LoadedRecipe, plan: RowPlan) -> dict:
    """The report's column mapping: where each training column came from."""
    return {
        "image": plan.image_column,
        "conditioning_image": plan.conditioning_column or f"computed: {loaded.recipe.condition.type}",
        "prompt": plan.prompt_column if plan.prompt_template is None else f"template: {plan.prompt_template}",
    }


def _order(n: int, spec: DatasetSpec, seed: int) -> Any:
    """The source rows to build, in order: shuffled (or not) and cut to max_samples."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n) if spec.shuffle else np.arange(n)
    return order[: spec.max_samples]


def _prepare(source: SourceData, plan: RowPlan, order: Any) -> Any:
    """The rows in `order`, needed columns only, images left undecoded, text as bytes."""
    import datasets

    from recipe_runner.data.process import template_fields

    ds = source.dataset
    if source.builtin is None:
        images = {plan.image_column, plan.conditioning_column} - {None}
        texts = set(template_fields(plan.prompt_template)) if plan.prompt_template else {plan.prompt_column}
        ds = ds.select_columns([c for c in ds.column_names if c in images | texts or c in (ROW, BASE_DIR)])
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):  # opened row by row, so one bad file drops one row
                ds = ds.cast_column(name, datasets.Image(decode=False))
            elif name in texts - images and getattr(feature, "dtype", None) in ("string", "large_string"):
                # Files from other tools can hold invalid UTF-8 in string columns, and reading those
                # raises; as bytes they are decoded with replacement (and counted) by the workers.
                ds = ds.cast_column(name, datasets.Value(feature.dtype.replace("string", "binary")))
    return ds.select(order)


def _map(
    ds: Any, plan: RowPlan, condition: Any, spec: DatasetSpec, key: str, work: Path, console: Console | None
) -> Any:
    from recipe_runner.data.process import RowProcessor, output_features

    num_proc = min(spec.num_proc, len(ds))
    with build_progress(console, len(ds), work) as pdir, interrupts_stay_interrupts():
        return ds.map(
            RowProcessor(plan, condition, pdir),
            batched=True,
            batch_size=spec.batch_size,
            writer_batch_size=spec.batch_size,  # images are big: write every batch, not every 1,000 rows
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=ds.column_names,
            features=output_features(),
            cache_file_name=str(work / "rows.arrow"),
            new_fingerprint=key[:40],  # skips hashing the condition object; the cache key says it all
        )
