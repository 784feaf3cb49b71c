"""Aspect-ratio buckets: the training sizes an image can be cropped to, and which one an image gets.

Written by hand because none of the field's libraries exposes it as a function: kohya's sd-scripts,
SimpleTuner and ai-toolkit each build their buckets inside their own data loaders. We follow kohya's
rule (sides in multiples of a step, area at most the square resolution's), made symmetric so that a
portrait and a landscape image of the same shape get transposed buckets. No torch here: `recipe plan`
lists the buckets without importing it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

    from recipe_runner.recipe.dataset import DatasetSpec
    from recipe_runner.recipe.recipe import Recipe

_CHUNK = 1024
_PNG = b"\x89PNG\r\n\x1a\n"
Size = tuple[int, int]  # (width, height) in pixels, as PIL gives it


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[Size]:
    """Every (width, height) with sides a multiple of `step`, area at most resolution², the most
    pixels for its width, and long side / short side at most `max_aspect`; ordered by aspect ratio
    (tallest first). Always contains the square (resolution, resolution)."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for short in range(step, resolution + 1, step):
        long = area // short // step * step
        if long >= short and long / short <= max_aspect + 1e-9:
            sizes.update({(short, long), (long, short)})
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(size: Size, buckets: list[Size] | tuple[Size, ...]) -> Size:
    """The bucket whose aspect ratio is closest to `size`'s, on a log scale (so 1:2 and 2:1 are as far
    from square); ties go to the first in `buckets`."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def describe(buckets: list[Size] | tuple[Size, ...]) -> str:
    """`384x640 448x576 512x512 …` for messages."""
    return " ".join(f"{w}x{h}" for w, h in buckets)


def dataset_buckets(spec: DatasetSpec) -> list[Size]:
    """The recipe's buckets; empty when bucketing is off (every image is a resolution² square)."""
    b = spec.buckets
    return bucket_sizes(spec.resolution, b.step, b.max_aspect) if b.enabled else []


def image_sizes(rows: Dataset, column: str = "image") -> list[Size]:
    """The (width, height) of every image in a built dataset, from the PNG headers alone: decoding 50,000
    images to learn their sizes would take minutes; slicing 24 bytes of each out of the memory-mapped
    arrow file takes well under a second."""
    import pyarrow.compute as pc

    table = rows.select_columns([column]).with_format("arrow")
    sizes: list[Size] = []
    for start in range(0, len(rows), _CHUNK):
        cells = pc.struct_field(table[start : start + _CHUNK].column(column), "bytes")
        for i, head in enumerate(pc.binary_slice(cells, 0, 24).to_pylist()):
            if head[:8] == _PNG and head[12:16] == b"IHDR":
                sizes.append((int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")))
            else:  # not a PNG our build wrote: let datasets decode it
                sizes.append(rows[start + i][column].size)
    return sizes


def bucket_counts(sizes: list[Size]) -> dict[str, int]:
    """Rows per bucket, as `WxH`: rows, widest last (for reports)."""
    counts = Counter(sizes)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts, key=lambda s: s[0] / s[1])}


def target_size(size: Size, buckets: list[Size] | tuple[Size, ...], resolution: int) -> Size:
    """The training size of an image of `size`: its nearest bucket, or the square when there are none."""
    return nearest_bucket(size, buckets) if buckets else (resolution, resolution)


def training_size(spec: DatasetSpec, size: Size) -> Size:
    """The size a model trained on this dataset generates for a condition image of `size` (the one the
    dataset build cut such an image to)."""
    return target_size(size, dataset_buckets(spec), spec.resolution)


def global_batch(recipe: Recipe) -> int:
    """Rows in one micro-step across every process: the unit a bucket is padded to."""
    return recipe.train.batch_size * recipe.launch.total_processes


def small_buckets(counts: dict[str, int | None], batch: int) -> str | None:
    """A warning for buckets with fewer rows than one global batch: their batches repeat rows, every epoch."""
    few = {size: n for size, n in counts.items() if n and n < batch}
    if not few:
        return None
    shown = ", ".join(f"{size} ({n})" for size, n in few.items())
    return (
        f"aspect buckets with fewer rows than a batch of {batch}: {shown}; each batch from them repeats "
        "its rows (a lower dataset.buckets.max_aspect merges the most elongated into their neighbours)"
    )
