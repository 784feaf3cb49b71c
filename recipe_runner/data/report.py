"""What a dataset build says about itself: the report's tallies of dropped and noted rows, the checks that
enough rows are left, the digest of the built files, and the summary printed after the stage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from recipe_runner.data.buckets import global_batch, small_buckets
from recipe_runner.data.cache_key import computes_condition
from recipe_runner.data.sources import SourceData
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.layout import RunFolder

if TYPE_CHECKING:
    from rich.console import Console

EXAMPLES = 5  # rows named per reason in report.json


def tally(rows: list[int], files: list[str], labels: list[str], details: list[str] | None = None) -> dict:
    """{label: {count, examples: [{row, file[, detail]}]}} over the non-empty labels ("a|b" holds two)."""
    out: dict[str, dict] = {}
    for i, (row, file, label) in enumerate(zip(rows, files, labels, strict=True)):
        for name in filter(None, label.split("|")):
            entry = out.setdefault(name, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < EXAMPLES:
                example = {"row": row, "file": file}
                entry["examples"].append(
                    {**example, "detail": details[i]} if details and details[i] else example
                )
    return out


def check_rows(kept: int, processed: int, dropped: dict, holdout: int, source: SourceData) -> None:
    if kept == 0:
        reasons = "; ".join(
            f"{reason}: {d['count']} (e.g. row {d['examples'][0]['row']} {d['examples'][0]['file']})".rstrip()
            for reason, d in dropped.items()
        )
        raise UserError(
            f"dataset: no rows left from {source.description}: all {processed} rows were dropped ({reasons})",
            hint="fix the files named above, or relax dataset.filters",
        )
    if kept <= holdout:
        raise UserError(
            f"dataset: only {kept} rows left after filtering, but dataset.holdout is {holdout}",
            hint="lower dataset.holdout, or add rows",
        )


def data_digest(data: Path) -> str:
    """sha256 of the built arrow files: equal for equal rows (the build is deterministic)."""
    h = hashlib.sha256()
    for f in sorted(data.rglob("*.arrow")):
        h.update(f.relative_to(data).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def report_rows(report: dict) -> int:
    return sum((report.get("rows_out") or {}).values())


def print_summary(console: Console, report: dict, folder: RunFolder, loaded: LoadedRecipe) -> None:
    if report.get("streaming"):
        held = (report.get("rows_out") or {}).get("holdout", 0)
        console.print(
            escape(
                f"dataset: streaming from {report['source']}: not built; training reads and processes the "
                f"rows as it goes. Read its first rows: {report['preview_rows']} for the preview"
                + (f", {held} held out (never trained on)" if held else "")
                + (f", {report['rows_dropped']} dropped" if report["rows_dropped"] else "")
                + f" -> {folder.dataset}"
            ),
            soft_wrap=True,
            highlight=False,
        )
        return
    out = ", ".join(f"{n} {split}" for split, n in report["rows_out"].items())
    dropped = report["rows_dropped"]
    why = "; ".join(f"{k}: {v['count']}" for k, v in report["dropped"].items())
    console.print(
        escape(
            f"dataset: {out} rows from {report['source']}"
            + (f", {dropped} dropped ({why})" if dropped else "")
            + f" in {report['seconds']:.1f} s ({report['rows_per_second']} rows/s) -> {folder.dataset}"
        ),
        soft_wrap=True,  # keep the path in one piece
        highlight=False,
    )
    if report.get("buckets"):
        shares = ", ".join(f"{size} {n}" for size, n in report["buckets"].items())
        console.print(f"  aspect-ratio buckets (train rows): {shares}", highlight=False)
        if (few := small_buckets(report["buckets"], global_batch(loaded.recipe))) is not None:
            console.print(f"[yellow]warning:[/] {escape(few)}", highlight=False)
    for note, entry in report.get("warnings", {}).items():
        first = entry["examples"][0]
        example = f"e.g. row {first['row']}" + (f" {first['file']}" if first["file"] else "")
        rows = f"{entry['count']} row{'' if entry['count'] == 1 else 's'}"
        console.print(escape(f"  {rows}: {note} ({example})"), highlight=False, soft_wrap=True)
    from recipe_runner.data.process import BLANK

    kept = sum(report["rows_out"].values())
    blanks = report.get("warnings", {}).get(BLANK, {}).get("count", 0)
    if blanks and blanks >= 0.05 * kept:
        console.print(f"[yellow]warning:[/] {escape(blank_hint(loaded, blanks, kept))}", highlight=False)


def blank_hint(loaded: LoadedRecipe, blanks: int, kept: int) -> str:
    """Why a share of conditioning images came out blank, and what to change."""
    cond = loaded.recipe.condition
    share = f"{blanks} of {kept} conditioning images ({blanks / kept:.0%}) are one flat colour"
    if not computes_condition(loaded):
        cause = "check that dataset.columns.conditioning_image (or conditioning_dir) holds the conditions"
    elif cond.type == "canny":
        cause = (
            f"the canny condition found no edges in them: lower its thresholds "
            f"({cond.low_threshold}/{cond.high_threshold})"
        )
    else:
        cause = f"the {cond.type} condition found nothing in them: check its settings"
    return f"{share}: {cause}, or set dataset.filters.on_blank_conditioning: drop"
