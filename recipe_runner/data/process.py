"""One source row in, one training row out: open, orient, RGB, resize, crop, condition, prompt.

`RowProcessor` is the function given to `datasets.map(batched=True, num_proc=N)`; it is pickled to each
worker, so it holds only plain settings and the (lazily set up) condition. Every random choice comes
from the row's own index and the recipe seed, so the result does not depend on `num_proc`, batch size
or shuffling.

Choices, and why:
- RGB: transparency is composited onto white and 16-bit grey is scaled (not clipped) to 8 bits,
  using the conditions' own `to_rgb` so that a computed condition sees the same pixels.
- The image is resized with LANCZOS (sharpest for photos). A given conditioning image is resized with
  BILINEAR, as diffusers' ControlNet training script does: LANCZOS rings around thin lines, and NEAREST
  aliases them. Both get the same crop (as a fraction of their size), so they stay aligned even when
  the conditioning image has another size.
- A bad image never raises inside a worker unless `on_bad_image: error`; the row comes back marked
  with the reason, and the build stage drops it and counts it in the report.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recipe_runner.data.buckets import dataset_buckets, target_size
from recipe_runner.data.images import BadImage, blank, crop_box, fit, open_image, png
from recipe_runner.data.sources import BASE_DIR, ROW, SourceData
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe

DROP, FILE, COLUMN, NOTES = "__drop__", "__file__", "__column__", "__notes__"
BOOKKEEPING = (ROW, DROP, FILE, COLUMN, NOTES)
BLANK, EMPTY_PROMPT = "blank conditioning image", "empty prompt"  # notes the build summary explains
_CROP_STREAM = 0x0C12  # keeps the crop's random stream apart from the builtin generator's (seed, index)
_progress: dict[str, int] = {}  # rows done per progress folder, in this process


def output_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "prompt": datasets.Value("string"),
            **{name: datasets.Value("int64" if name == ROW else "string") for name in BOOKKEEPING},
        }
    )


class RowError(Exception):
    """A row that stops the build (`on_bad_image: error`, a prompt template that fails); args are
    (message, hint) so that it pickles back from worker processes. The build turns it into a UserError."""


@dataclass(frozen=True)
class RowPlan:
    """Everything a worker needs to know about the recipe: plain, picklable settings."""

    resolution: int
    crop: str
    seed: int
    min_size: int
    on_bad_image: str
    image_column: str
    conditioning_column: str | None  # None: computed by the condition from the processed image
    prompt_column: str | None
    prompt_template: str | None  # overrides prompt_column; a constant when it has no placeholders
    builtin: str | None = None
    drop_blank: bool = False  # filters.on_blank_conditioning: drop
    buckets: tuple[tuple[int, int], ...] = ()  # aspect-ratio buckets (width, height); empty: square crops


def template_fields(template: str) -> list[str]:
    """Column names a prompt template refers to; raises ValueError for a malformed or positional one."""
    names = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not name or name.isdigit():
            raise ValueError("placeholders must name a column, e.g. {name}; positional {} cannot be filled")
        names.append(name)
    return names


def row_plan(loaded: LoadedRecipe, source: SourceData) -> RowPlan:
    """The column mapping checked against the source's columns, as settings for the workers."""
    spec, cols = loaded.recipe.dataset, source.columns
    cond = spec.columns.conditioning_image or ("conditioning_image" if spec.source.conditioning_dir else None)
    need_column(cols, spec.columns.image, "dataset.columns.image", source)
    if cond is not None:
        need_column(cols, cond, "dataset.columns.conditioning_image", source)
    if spec.prompt is not None:
        try:
            fields = template_fields(spec.prompt)
        except ValueError as e:
            raise UserError(
                f"dataset.prompt: {spec.prompt!r} is not a valid template: {e}",
                hint="write {{ and }} for literal braces",
            ) from None
        for name in fields:
            need_column(cols, name, f"dataset.prompt: placeholder {{{name}}}", source)
    else:
        need_column(cols, spec.columns.prompt, "dataset.columns.prompt", source)
    f = spec.filters
    return RowPlan(
        resolution=spec.resolution,
        crop=spec.crop,
        seed=loaded.recipe.seed,
        min_size=f.min_size,
        on_bad_image=f.on_bad_image,
        image_column=spec.columns.image,
        conditioning_column=cond,
        prompt_column=None if spec.prompt is not None else spec.columns.prompt,
        prompt_template=spec.prompt,
        builtin=source.builtin,
        drop_blank=f.on_blank_conditioning == "drop",
        buckets=tuple(dataset_buckets(spec)),
    )


def need_column(columns: list[str], name: str | None, field: str, source: SourceData) -> None:
    if name in columns:
        return
    close = difflib.get_close_matches(str(name), columns, n=1)
    raise UserError(
        f"{field}: no column {name!r} in {source.description} (columns: {', '.join(columns)})",
        hint=f"did you mean {close[0]!r}?" if close else "name one of the columns above",
    )


def text(value: Any) -> str:
    """A prompt from any cell: bytes decoded as UTF-8 (invalid bytes replaced), None as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


class RowProcessor:
    """The batched `datasets.map` function: source rows in, training rows (or drop records) out."""

    def __init__(self, plan: RowPlan, condition: Any = None, progress_dir: str | None = None):
        self.plan = plan
        self.condition = condition
        self.progress_dir = progress_dir

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.condition is not None:
            self.condition.setup()  # once per worker process; later calls return at once
        n = len(batch[ROW])
        out: dict[str, list] = {k: [] for k in ("image", "conditioning_image", "prompt", *BOOKKEEPING)}
        for i in range(n):
            values = {k: v[i] for k, v in batch.items()}
            for k, v in self._row(values).items():
                out[k].append(v)
        self._advance(n)
        return out

    def _values(self, values: dict) -> dict:
        if self.plan.builtin is None:
            return values
        from recipe_runner.data.builtin_shapes import make_sample

        return make_sample(values[ROW], seed=self.plan.seed, resolution=self.plan.resolution)

    def _row(self, raw: dict) -> dict:
        out = self.process(raw)
        if not out[DROP]:  # a kept row's images, encoded for the arrow writer
            out["image"], out["conditioning_image"] = png(out["image"]), png(out["conditioning_image"])
        return out

    def process(self, raw: dict) -> dict:
        """One source row as a training row with PIL images (or a drop record, DROP saying why); the
        dataset stage encodes the images, a streaming source trains on them as they are."""
        p, row = self.plan, raw[ROW]
        values, base = self._values(raw), raw.get(BASE_DIR)
        notes = []
        try:
            image, full = open_image(values[p.image_column], base, draft=p.resolution)
        except BadImage as e:
            return self._bad(row, p.image_column, e)
        if min(full) < p.min_size:
            return self._drop(
                row,
                f"{p.image_column}: smaller than min_size",
                _name(values[p.image_column]),
                p.image_column,
                f"{full[0]}x{full[1]}",
            )
        rng = np.random.default_rng([p.seed, row, _CROP_STREAM]) if p.crop == "random" else None
        size = target_size(full, p.buckets, p.resolution)
        box = crop_box(image.size, p.crop, rng, size[0] / size[1])
        rgb = fit(image, box, size, Image.Resampling.LANCZOS)
        if p.conditioning_column is None:
            cond = self.condition(rgb)
        else:
            try:
                cimage, cfull = open_image(values[p.conditioning_column], base)
            except BadImage as e:
                return self._bad(row, p.conditioning_column, e)
            if cfull != full:
                notes.append("conditioning image resized to match its image")
            cond = fit(cimage, box, size, Image.Resampling.BILINEAR)
        if blank(cond):
            if p.drop_blank:
                column = p.conditioning_column or "conditioning_image"
                return self._drop(
                    row, f"{column}: blank (one flat colour)", _name(values[p.image_column]), column, ""
                )
            notes.append(BLANK)
        prompt = self._prompt(values, row)
        if "\ufffd" in prompt:
            notes.append("prompt had invalid UTF-8 (replaced)")
        if not prompt.strip():
            notes.append(EMPTY_PROMPT)
        return {
            "image": rgb,
            "conditioning_image": cond,
            "prompt": prompt,
            ROW: row,
            DROP: "",
            FILE: _name(values[p.image_column]),
            COLUMN: "",
            NOTES: "|".join(notes),
        }

    def _prompt(self, values: dict, row: int) -> str:
        p = self.plan
        if p.prompt_template is None:
            return text(values[p.prompt_column])
        fields = {k: text(v) if v is None or isinstance(v, (bytes, str)) else v for k, v in values.items()}
        try:
            return p.prompt_template.format_map(fields)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise RowError(
                f"dataset.prompt: {p.prompt_template!r} failed on row {row}: {type(e).__name__}: {e}",
                "check the placeholders' format specs against the column's values",
            ) from None

    def _bad(self, row: int, column: str, e: BadImage) -> dict:
        if self.plan.on_bad_image == "error":
            where = f" ({e.file})" if e.file else ""
            raise RowError(
                f"row {row}{where}: {column}: {e.reason}" + (f" ({e.detail})" if e.detail else ""),
                "fix or remove the file, or set dataset.filters.on_bad_image: drop to skip such rows",
            )
        return self._drop(row, f"{column}: {e.reason}", e.file, column, e.detail)

    @staticmethod
    def _drop(row: int, reason: str, file: str, column: str, detail: str) -> dict:
        return {
            "image": None,
            "conditioning_image": None,
            "prompt": "",
            ROW: row,
            DROP: reason,
            FILE: file,
            COLUMN: column,
            NOTES: detail,
        }

    def _advance(self, n: int) -> None:
        # Rows done in this process, written where the build's progress bar reads them: works the same
        # for num_proc=1 and for worker processes, without sharing memory.
        if self.progress_dir is None:
            return
        done = _progress[self.progress_dir] = _progress.get(self.progress_dir, 0) + n
        tmp = os.path.join(self.progress_dir, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(str(done))
        os.replace(tmp, os.path.join(self.progress_dir, str(os.getpid())))


def _name(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or ""
    return ""


def rows_done(progress_dir: str) -> int:
    """Rows processed so far by every process of the build."""
    total = 0
    for name in os.listdir(progress_dir):
        if not name.startswith("."):
            try:
                total += int(Path(progress_dir, name).read_text() or 0)
            except (OSError, ValueError):
                pass
    return total
