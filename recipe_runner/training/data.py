"""Training rows and their order: which rows each process sees at each micro-step.

The order is a pure function of (seed, epoch), never of a global RNG or a DataLoader's state, so a resumed
run can jump to any micro-step and see exactly the batches an uninterrupted run would have seen. A
streaming source (`stream_batches`) has no such plan: its rows come in the stream's order, and a resumed
run continues from the position its checkpoint stored (data/stream.py).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from PIL import Image
from torch.utils.data import DataLoader

from recipe_runner.data.buckets import Size, dataset_buckets, describe, image_sizes
from recipe_runner.errors import UserError
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.training.keys import derive_seed

COLUMNS = ("image", "conditioning_image", "prompt")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def load_rows(data_dir: Path, recipe: Recipe) -> DatasetDict:
    """The built dataset, checked against the contract (columns, a `train` split, the resolution)."""
    if not (Path(data_dir) / "dataset_dict.json").is_file():
        raise UserError(
            f"no built dataset at {data_dir}",
            hint="build it first: recipe build-dataset RECIPE (recipe train does this when it is missing)",
        )
    data = load_from_disk(str(data_dir))
    # A streaming source's dataset/ holds only its first rows (preview, holdout): the stream is the rest.
    split = "preview" if recipe.dataset.source.streams else "train"
    if not isinstance(data, DatasetDict) or split not in data:
        raise UserError(
            f"the dataset at {data_dir} has no `{split}` split", hint="rebuild it: recipe build-dataset"
        )
    train = data[split]
    missing = [c for c in COLUMNS if c not in train.column_names]
    if missing or len(train) == 0:
        what = f"lacks columns {', '.join(missing)}" if missing else "has no rows"
        raise UserError(f"the dataset at {data_dir} {what}", hint="rebuild it: recipe build-dataset")
    size = train[0]["image"].size
    res = recipe.dataset.resolution
    buckets = dataset_buckets(recipe.dataset)
    if buckets:
        if size not in buckets:
            raise UserError(
                f"the dataset at {data_dir} has a {size[0]}x{size[1]} px image, which is none of "
                f"dataset.buckets' sizes ({describe(buckets)})",
                hint="rebuild the dataset (recipe build-dataset): it was built with other bucket settings",
            )
    elif size != (res, res):
        raise UserError(
            f"the dataset at {data_dir} was built at {size[0]}x{size[1]} px, but dataset.resolution is {res}",
            hint="rebuild the dataset (recipe build-dataset) or set dataset.resolution to match",
        )
    if recipe.model.conditioning_channels not in _MODES:
        raise UserError(
            f"model.conditioning_channels: {recipe.model.conditioning_channels} is not an image mode the "
            "dataset can give",
            hint="use 1 (grey), 3 (RGB) or 4 (RGBA)",
        )
    return data


def _fit(image: Image.Image, resolution: int | None) -> Image.Image:
    """Resize the shorter side and centre-crop (the reference's transforms; a no-op for built data, and
    for None: bucketed rows keep the size the build gave them)."""
    if resolution is None or image.size == (resolution, resolution):
        return image
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize(
        (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR
    )
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixels(image: Image.Image, resolution: int | None) -> torch.Tensor:
    """A training image as (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(_fit(image.convert("RGB"), resolution), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_conditioning(image: Image.Image, resolution: int | None, channels: int = 3) -> torch.Tensor:
    """A conditioning image as (channels, H, W) float32 in [0, 1]."""
    array = np.asarray(_fit(image.convert(_MODES[channels]), resolution), dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1) / 255.0


class RowSource(torch.utils.data.Dataset):
    """Decoded rows; with a precompute cache only the conditioning image is read (latents and text come
    from the cache)."""

    def __init__(self, rows: Dataset, resolution: int | None, channels: int, *, precomputed: bool):
        columns = ["conditioning_image"] if precomputed else list(COLUMNS)
        self.rows = rows.select_columns(columns)
        self.resolution = resolution
        self.channels = channels
        self.precomputed = precomputed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        item = {
            "index": int(index),
            "conditioning": to_conditioning(row["conditioning_image"], self.resolution, self.channels),
        }
        if not self.precomputed:
            item["pixels"] = to_pixels(row["image"], self.resolution)
            item["prompt"] = row["prompt"]
        return item


def collate(items: list[dict]) -> dict:
    batch: dict = {"index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    batch["conditioning"] = torch.stack([it["conditioning"] for it in items])
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])
        batch["prompt"] = [it["prompt"] for it in items]
    return batch


@dataclass(frozen=True)
class BatchPlan:
    """Which rows process `rank` trains on at micro-batch k of an epoch.

    Each epoch is a seeded permutation, padded (by repeating its start) to a multiple of the process
    count like DistributedSampler. Micro-batch k is the global batch order[k*B*W : (k+1)*B*W], of which
    process r takes the r-th contiguous chunk; a sample's global position in that batch seeds its noise,
    so one process with batch 4 and two with batch 2 train on the same samples with the same noise.
    """

    num_rows: int
    batch_size: int
    num_processes: int
    rank: int
    seed: int

    @property
    def padded_rows(self) -> int:
        return math.ceil(self.num_rows / self.num_processes) * self.num_processes

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.padded_rows / self.global_batch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(self.num_rows, generator=generator)
        repeats = math.ceil(self.padded_rows / self.num_rows)
        return order.repeat(repeats)[: self.padded_rows]

    def rows_drawn(self, micro_steps: int) -> list[int] | None:
        """The rows every process together draws in micro-steps 0 .. micro_steps-1, in no order; None
        when that is every row (a whole epoch or more)."""
        if micro_steps >= self.batches_per_epoch:
            return None
        return sorted(set(self.epoch_order(0)[: micro_steps * self.global_batch].tolist()))

    def batch(self, order: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
        """(row indices, global positions) of this process's share of micro-batch k."""
        chunk = order[k * self.global_batch : (k + 1) * self.global_batch]
        per_process = len(chunk) // self.num_processes
        start = self.rank * per_process
        positions = list(range(start, start + per_process))
        return chunk[start : start + per_process].tolist(), positions


@dataclass(frozen=True)
class BucketPlan(BatchPlan):
    """A BatchPlan whose every global batch comes from one aspect-ratio bucket (rows of one size).

    Each epoch shuffles the rows within each bucket, pads each bucket by repeating its start to a whole
    number of global batches, then shuffles the order of the batches: all from (seed, epoch), so resume
    and the process count work as they do for square data. The padding repeats at most
    global_batch - 1 rows per bucket and epoch, as a DistributedSampler's does per epoch.
    """

    sizes: tuple[Size, ...] = ()  # each row's (width, height)

    @property
    def padded_rows(self) -> int:
        return sum(self._whole(len(rows)) for rows in self._buckets.values())

    def _whole(self, n: int) -> int:
        return math.ceil(n / self.global_batch) * self.global_batch

    @functools.cached_property
    def _buckets(self) -> dict[Size, list[int]]:
        groups: dict[Size, list[int]] = {}
        for row, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(row)
        return dict(sorted(groups.items()))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        batches = []
        for rows in self._buckets.values():
            shuffled = torch.tensor(rows)[torch.randperm(len(rows), generator=generator)]
            whole = self._whole(len(rows))
            padded = shuffled.repeat(math.ceil(whole / len(rows)))[:whole]
            batches.extend(padded.split(self.global_batch))
        order = torch.randperm(len(batches), generator=generator)
        return torch.cat([batches[i] for i in order.tolist()])


def batch_plan(recipe: Recipe, rows: Dataset, num_processes: int, rank: int) -> BatchPlan:
    """The recipe's plan over the built train rows: by bucket when `dataset.buckets` is on."""
    batch = recipe.train.batch_size
    if not recipe.dataset.buckets.enabled:
        return BatchPlan(len(rows), batch, num_processes, rank, recipe.seed)
    return BucketPlan(len(rows), batch, num_processes, rank, recipe.seed, sizes=tuple(image_sizes(rows)))


def loader_workers(requested: int | None, device: torch.device) -> int:
    """The recipe's worker count, or for null: none on a CPU, else up to 4 per local GPU."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    per_gpu = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
    return max(0, min(4, per_gpu - 1))  # one core stays with the training process


def _ignore_ctrl_c(_worker_id: int) -> None:
    # A terminal's Ctrl-C reaches every process of the job: a loader worker that died of it would fail
    # the step that training finishes before it stops and checkpoints.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(
    source: RowSource, plan: BatchPlan, start: int, stop: int, workers: int, device: torch.device
) -> Iterator[tuple[dict, list[int]]]:
    """(batch, global positions) for micro-steps start .. stop-1, epoch by epoch.

    One DataLoader for the whole run: its workers start once and read ahead across epoch ends."""

    def schedule() -> Iterator[tuple[list[int], list[int]]]:
        micro = start
        while micro < stop:
            epoch, first = divmod(micro, plan.batches_per_epoch)
            order = plan.epoch_order(epoch)
            last = min(plan.batches_per_epoch, first + stop - micro)
            for k in range(first, last):
                yield plan.batch(order, k)
            micro += last - first

    loader = DataLoader(
        source,
        batch_sampler=(rows for rows, _ in schedule()),  # read once, ahead of the loop when workers run
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_ctrl_c,
    )
    for batch, (_, positions) in zip(loader, schedule(), strict=True):
        yield batch, positions


def stream_batches(
    rows: Iterator[dict], batch_size: int, rank: int, resolution: int, channels: int
) -> Iterator[tuple[dict, list[int]]]:
    """(batch, global positions) from a streaming source's processed rows (data/stream.py), read in this
    process as training asks: nothing is read ahead, so the stream's position is that of the steps done."""
    positions = list(range(rank * batch_size, (rank + 1) * batch_size))
    while True:
        items = []
        for row in itertools.islice(rows, batch_size):
            items.append(
                {
                    "index": -1,  # no precompute cache to look rows up in
                    "conditioning": to_conditioning(row["conditioning_image"], resolution, channels),
                    "pixels": to_pixels(row["image"], resolution),
                    "prompt": row["prompt"],
                }
            )
        yield collate(items), positions
