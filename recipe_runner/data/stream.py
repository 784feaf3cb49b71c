"""Streaming sources: rows read, processed and trained on as they come, never built into `dataset/`.

A `webdataset` source (tar shards) or a `hub` source with `streaming: true` becomes a `datasets`
IterableDataset; each row goes through the dataset stage's own processing (`process.RowProcessor`:
column mapping, resize and crop, the condition made on the fly) when training asks for it.

    rows = StreamRows(loaded, rank, world, exclude=held_out)   # this process's share, epoch after epoch
    for row in rows: ...                                       # {"image", "conditioning_image", "prompt"}
    rows.position() / rows.restore(position)                   # what a checkpoint keeps, and resume

Order: the shard order and a buffer of `shuffle_buffer` rows are shuffled with the recipe seed and the
epoch (datasets' `shuffle` + `set_epoch`), then `split_dataset_by_node` gives each process its share
(whole shards when their number divides by the processes, else every N-th row). A position is the
epoch and the raw rows this process has read in it. Unshuffled, resume loads datasets' `state_dict`
(it seeks to the shard and row); shuffled, it replays the epoch's order up to the position without
decoding the rows read before, because datasets' state does not keep the buffer's content (its resume
would continue with other rows than an uninterrupted run).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recipe_runner.data.process import DROP, RowError, RowProcessor, row_plan, template_fields
from recipe_runner.data.sources import ROW, SourceData, hub_source
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe

PREVIEW_ROWS = 16  # processed rows the dataset stage keeps for preview.png and default validation


def open_stream(loaded: LoadedRecipe) -> SourceData:
    """The recipe's streaming source as an IterableDataset of raw rows."""
    src = loaded.recipe.dataset.source
    if src.hub is not None:
        return hub_source(src.hub, src.config, src.split, src.revision, streaming=True)
    import datasets

    from recipe_runner.data.shards import check_shard_columns
    from recipe_runner.recipe.shards import shard_files

    files = shard_files(loaded)
    columns = loaded.recipe.dataset.columns
    wanted = {"dataset.columns.image": columns.image}
    if columns.conditioning_image is not None:
        wanted["dataset.columns.conditioning_image"] = columns.conditioning_image
    if loaded.recipe.dataset.prompt is None and columns.prompt is not None:
        wanted["dataset.columns.prompt"] = columns.prompt
    check_shard_columns(files, wanted)
    try:
        ds = datasets.load_dataset(
            "webdataset", data_files={"train": [str(f) for f in files]}, split="train", streaming=True
        )
    except Exception as e:  # the library's message says which file and what is wrong
        raise UserError(f"dataset.source.webdataset: could not read the shards: {e}") from None
    where = files[0].parent
    what = f"{len(files)} WebDataset shard{'s' * (len(files) > 1)} in {where}"
    return SourceData(ds, what, [c for c in ds.features if not c.startswith("__")])


def _raw(source: SourceData, image_columns: set[str], keep: set[str]) -> Any:
    """Only the columns the rows need (plus the sample key), images left undecoded: rows skipped on
    resume or held out cost no decoding."""
    import datasets

    ds = source.dataset
    features = ds.features or {}
    names = [c for c in features if c in keep or c in ("__key__", "__url__")]
    if names and len(names) < len(features):
        ds = ds.select_columns(names)
    for name in image_columns:
        if isinstance(features.get(name), datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def row_identity(raw: dict, image_column: str) -> str:
    """A row's name for the held-out set: shard and sample key for WebDataset, else its image's bytes."""
    if raw.get("__key__") is not None:
        return f"{Path(str(raw.get('__url__') or '')).name}/{raw['__key__']}"
    cell = raw.get(image_column)
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    data = cell if isinstance(cell, (bytes, bytearray)) else repr(cell).encode()
    return hashlib.sha256(data).hexdigest()[:32]


class StreamRows:
    """One process's share of a streaming source as processed training rows, epoch after epoch."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        rank: int = 0,
        world: int = 1,
        *,
        exclude: frozenset[str] = frozenset(),
        shuffle: bool | None = None,
    ):
        spec = loaded.recipe.dataset
        source = open_stream(loaded)
        self.description = source.description
        self.plan = row_plan(loaded, source)
        condition = None
        if self.plan.conditioning_column is None:
            from recipe_runner.conditions import build_condition

            condition = build_condition(loaded.recipe.condition, base_dir=loaded.base_dir)
            condition.setup()
        self.processor = RowProcessor(self.plan, condition)
        p = self.plan
        images = {p.image_column, p.conditioning_column} - {None}
        texts = set(template_fields(p.prompt_template)) if p.prompt_template else {p.prompt_column}
        ds = _raw(source, images, images | texts)
        self.shuffled = spec.shuffle if shuffle is None else shuffle
        # The order a position counts rows in: a position of another order would be another place.
        self.order = f"shuffled, buffer {spec.source.shuffle_buffer}" if self.shuffled else "shard order"
        if self.shuffled:
            ds = ds.shuffle(seed=loaded.recipe.seed, buffer_size=spec.source.shuffle_buffer)
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.dataset, self.rank, self.world = ds, rank, world
        self.exclude = exclude
        self.epoch, self.read, self.dropped = 0, 0, 0
        self._state: dict | None = None  # datasets' state_dict to resume from (unshuffled)

    def position(self) -> dict:
        """Where this process is in the stream: what a checkpoint stores (JSON)."""
        out = {"epoch": self.epoch, "rows_read": self.read, "dropped": self.dropped, "order": self.order}
        if not self.shuffled:
            out["state_dict"] = self.dataset.state_dict()
        return out

    def restore(self, position: dict) -> None:
        """Continue at `position` (from `position()` of a run of the same recipe and process count)."""
        if position.get("order", self.order) != self.order:
            raise UserError(
                f"the checkpoint read the stream in another order ({position['order']}) than this recipe "
                f"does ({self.order}): it would continue at another row",
                hint="resume with the checkpoint's dataset.shuffle and dataset.source.shuffle_buffer, or run "
                "without --resume to start over",
            )
        self.epoch, self.read = int(position["epoch"]), int(position["rows_read"])
        self.dropped = int(position.get("dropped", 0))
        self._state = position.get("state_dict") if not self.shuffled else None

    def raw_rows(self) -> Iterator[dict]:
        """This epoch's raw rows from the current position on."""
        self.dataset.set_epoch(self.epoch)
        if self._state is not None:  # datasets seeks to the shard and row itself
            self.dataset.load_state_dict(self._state)
            self._state = None
            return iter(self.dataset)
        rows = iter(self.dataset)
        if self.read:  # the shuffled order is replayed up to the position, rows undecoded
            next(itertools.islice(rows, self.read - 1, self.read), None)
        return rows

    def process(self, raw: dict) -> dict:
        """One raw row processed (or a drop record); a row that must stop training is a UserError."""
        try:
            return self.processor.process(raw)
        except RowError as e:  # on_bad_image: error, a prompt template that fails
            where = f" ({raw['__url__']}, sample {raw['__key__']!r})" if raw.get("__key__") else ""
            raise UserError(f"dataset: {e.args[0]}{where}", hint=e.args[1]) from None

    def __iter__(self) -> Iterator[dict]:
        while True:
            kept, started_at = 0, self.read
            for raw in self.raw_rows():
                self.read += 1
                if self.exclude and row_identity(raw, self.plan.image_column) in self.exclude:
                    continue
                row = self.process({**raw, ROW: self.read - 1})
                if row[DROP]:
                    self.dropped += 1
                    continue
                kept += 1
                yield row
            if kept == 0 and started_at == 0:
                who = f" for process {self.rank} of {self.world}" if self.world > 1 else ""
                raise UserError(
                    f"dataset: no rows to train on{who} in {self.description} ({self.read} read, "
                    f"{self.read - self.dropped} held out, {self.dropped} dropped)"
                    if self.read
                    else f"dataset: no rows{who} in {self.description}",
                    hint="check the shards, or fewer processes than shards",
                )
            self.epoch, self.read = self.epoch + 1, 0


def first_rows(loaded: LoadedRecipe, holdout: int, preview: int = PREVIEW_ROWS) -> dict[str, Any]:
    """What the dataset stage of a streaming source reads: the first `holdout` rows in shard order (never
    trained on), then `preview` rows for preview.png and default validation conditions. Returns the
    processed rows, the held-out rows' identities, the drop records and the source's description."""
    rows = StreamRows(loaded, shuffle=False)
    held: list[dict] = []
    shown: list[dict] = []
    held_ids: list[str] = []
    drops: list[dict] = []
    for raw in itertools.islice(rows.raw_rows(), 10 * (holdout + preview) + 100):
        if len(held) >= holdout and len(shown) >= preview:
            break
        holding = len(held) < holdout
        if holding:
            held_ids.append(row_identity(raw, rows.plan.image_column))
        row = rows.process({**raw, ROW: len(held_ids) + len(shown) + len(drops)})
        if row[DROP]:
            drops.append(row)
        else:
            (held if holding else shown).append(row)
    return {
        "holdout": held,
        "preview": shown,
        "holdout_ids": held_ids,
        "drops": drops,
        "source": rows.description,
        "plan": rows.plan,
    }
