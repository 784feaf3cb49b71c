"""The precompute cache: VAE latent distributions and text embeddings of the train rows, computed once.

Steps then run only the UNet and the ControlNet. Arrays are .npy files opened with mmap (a big dataset's
latents need not fit in RAM) under `cache/<key>/`, where the key hashes everything they depend on; a
folder only gets its final name once complete (runfolder/atomic.py), so a killed precompute is redone.

A run shorter than an epoch draws only some rows: it encodes just those (`encoded.npy` marks them), and a
longer run later encodes the rows it lacks into the same folder, marking them once written (a killed
top-up is redone). Each row is encoded in a batch of the size a full precompute encodes it in, so it gets
the same latents whichever rows each run drew. Every prompt is encoded at once, as before.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

import recipe_runner
from recipe_runner.data.buckets import bucket_counts, image_sizes
from recipe_runner.families import Components, family_of
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.runfolder.atomic import atomic_dir, atomic_file, is_complete
from recipe_runner.runfolder.events import reporter
from recipe_runner.training.data import to_conditioning, to_pixels
from recipe_runner.training.encoding import encode_pixels, encode_prompts, vae_dtype, warn_overlong
from recipe_runner.training.keys import TRAINING_CODE_VERSION, sha256_json

CACHE_FORMAT = 1
_PROMPT_BATCH = 64


def _files_identity(folder: Path, subfolders: list[str]) -> list:
    """Names, sizes and mtimes of a local model's weights and configs: a rebuilt model gets a new key."""
    out = []
    for sub in subfolders:
        for p in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            if p.is_file():
                out.append([f"{sub}/{p.name}", p.stat().st_size, p.stat().st_mtime_ns])
    return out


def precompute_key(recipe: Recipe, base: str, dataset_fingerprint: str, dtype: torch.dtype) -> str:
    spec = recipe.model
    parts = [
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ]
    identity: dict[str, Any] = {"base": spec.base, "revision": spec.revision, "variant": spec.variant}
    if Path(base).is_dir():
        identity["files"] = _files_identity(Path(base), parts)
    if spec.vae is not None:
        identity["vae"] = spec.vae
        if Path(spec.vae).is_dir():
            identity["vae_files"] = _files_identity(Path(spec.vae), [".", "vae"])
    return sha256_json(
        {
            "format": CACHE_FORMAT,
            "model": identity,
            "family": spec.resolved_family,
            "resolution": recipe.dataset.resolution,
            # Bucketed rows are stored flat (another layout); off, left out so older caches stay valid.
            **({"layout": "flat"} if recipe.dataset.buckets.enabled else {}),
            # Families whose ControlNet takes latents get the conditioning images' latents too.
            **({"control_latents": True} if family_of(recipe).latent_control else {}),
            "dataset": dataset_fingerprint,
            "dtype": str(dtype),
            "code": [recipe_runner.__version__, TRAINING_CODE_VERSION],
        }
    )[:24]


@dataclass
class EncodedCache:
    """Row r's latents are N(latent_mean[r], latent_std[r]); its prompt's embedding is
    prompt_embeds[prompt_index[r]]; index 0 is the empty prompt. For the families whose ControlNet
    takes latents (SD3, FLUX.1), control_latents[r] are those of its conditioning image."""

    folder: Path
    latent_mean: np.ndarray
    latent_std: np.ndarray
    prompt_embeds: np.ndarray
    prompt_index: np.ndarray
    pooled: np.ndarray | None
    # Bucketed rows have latents of several shapes: then the latent arrays are flat, and row r's are
    # [latent_offsets[r] : latent_offsets[r + 1]] reshaped to latent_shapes[r].
    latent_offsets: np.ndarray | None = None
    latent_shapes: np.ndarray | None = None
    control_latents: np.ndarray | None = None  # laid out as latent_mean
    encoded: np.ndarray | None = None  # which rows have latents (a run shorter than an epoch); None: all

    EMPTY = 0

    def holds(self, num_rows: int, rows: list[int] | None = None) -> bool:
        """Whether this is the cache of `num_rows` train rows with latents for `rows` (None: every row)."""
        return len(self.prompt_index) == num_rows and not self.missing(rows)

    @property
    def rows_with_latents(self) -> int:
        """Every train row, or fewer after a run shorter than an epoch."""
        return len(self.prompt_index) if self.encoded is None else int(self.encoded.sum())

    def missing(self, rows: list[int] | None) -> list[int]:
        """Those of `rows` (None: every row) without latents yet."""
        if self.encoded is None:
            return []
        wanted = np.arange(len(self.encoded)) if rows is None else np.asarray(rows, dtype=np.int64)
        return wanted[~self.encoded[wanted]].tolist()

    def latents(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of these rows, stacked: (len(rows), C, h, w), contiguous in memory."""
        if self.encoded is not None and not self.encoded[rows].all():  # never zeros for latents
            raise RuntimeError(
                f"the precompute cache {self.folder} has no latents for rows {self.missing(list(rows))}: "
                "the rows it encoded and the batch plan disagree"
            )
        return self._take(self.latent_mean, rows), self._take(self.latent_std, rows)

    def controls(self, rows: np.ndarray) -> np.ndarray | None:
        """The conditioning images' latents of these rows, stacked (None: this family has none)."""
        if self.control_latents is None:
            return None
        return self._take(self.control_latents, rows)

    def _take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.latent_offsets is None:
            return np.ascontiguousarray(array[rows])
        o, shapes = self.latent_offsets, self.latent_shapes
        assert shapes is not None
        return np.stack([array[o[r] : o[r + 1]].reshape(shapes[r]) for r in rows])

    @classmethod
    def open(cls, folder: Path) -> EncodedCache | None:
        if not is_complete(folder):
            return None
        load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
        optional = lambda name: load(name) if (folder / f"{name}.npy").is_file() else None  # noqa: E731
        return cls(
            folder,
            load("latent_mean"),
            load("latent_std"),
            load("prompt_embeds"),
            load("prompt_index"),
            optional("pooled"),
            optional("latent_offsets"),
            optional("latent_shapes"),
            optional("control_latents"),
            optional("encoded"),
        )


def _storage(dtype: torch.dtype) -> np.dtype:
    # numpy has no bfloat16; bf16 values are stored as float32, which holds them exactly.
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


@dataclass(frozen=True)
class Shard:
    """This process's part of a precompute that `count` processes share (launch.num_processes > 1): the
    image batches k with k % count == index, and the prompt batches likewise, each encoded on this
    process's own device into the one cache that rank 0 allocates and completes. So no rank writes a
    private copy (diffusers #4089), and the batches are those one process would encode. `barrier`
    waits for every process; `share` gives every process rank 0's value."""

    index: int
    count: int
    barrier: Callable[[], None]
    share: Callable[[Any], Any]


@dataclass
class _Layout:
    """Where each row's latents go, and the batches the images are encoded in."""

    latent_shape: tuple[int, ...]
    batches: list[list[int]]
    batch_size: int  # of every batch but the last of each group
    sizes: list[tuple[int, int]] | None  # bucketed rows: (w, h) each; None: all square at resolution
    shapes: list[tuple[int, ...]] | None
    offsets: np.ndarray | None
    arrays: list[str]  # the .npy files of per-row latents
    columns: list[str]  # the dataset columns they are encoded from


def _layout(c: Components, recipe: Recipe, rows: Dataset) -> _Layout:
    resolution = recipe.dataset.resolution
    # Square rows: one (N, C, h, w) array. Bucketed rows: flat arrays, encoded bucket by bucket.
    sizes = image_sizes(rows) if recipe.dataset.buckets.enabled else None
    shapes = [c.latent_shape(h, w) for w, h in sizes] if sizes is not None else None
    offsets = None
    if shapes is None:
        latent_shape: tuple[int, ...] = (len(rows), *c.latent_shape(resolution))
        groups = [list(range(len(rows)))]
    else:
        offsets = np.concatenate([[0], np.cumsum([math.prod(s) for s in shapes])]).astype(np.int64)
        latent_shape = (int(offsets[-1]),)
        by_size: dict[tuple[int, int], list[int]] = {}
        for row, size in enumerate(sizes or []):
            by_size.setdefault(size, []).append(row)
        groups = list(by_size.values())
    batch = max(1, recipe.train.batch_size)
    batches = [group[start : start + batch] for group in groups for start in range(0, len(group), batch)]
    arrays, columns = ["latent_mean", "latent_std"], ["image"]
    if c.family.latent_control:
        arrays.append("control_latents")
        columns.append("conditioning_image")
    return _Layout(latent_shape, batches, batch, sizes, shapes, offsets, arrays, columns)


def _to_encode(
    layout: _Layout, num_rows: int, needed: list[int] | None, encoded: np.ndarray | None
) -> tuple[list[list[int]], np.ndarray]:
    """The batches to encode for the rows in `needed` (None: every row) without latents yet, and which
    rows they give latents to.

    Every row: the layout's batches. Some rows: those of each full layout batch in batches of the same
    size, the last filled up by repeating its rows, and any short layout batch (the last of its size)
    holding one of them whole. So each row is encoded in a batch of the size a full precompute encodes
    it in: a sample's latents may depend on its batch's size (which picks the kernels; on this project's
    CPU batch 1 differed), not on the other samples in it, as no layer mixes samples
    (tests/training/test_precompute_partial.py trains bit-identically either way on the CPU)."""
    if needed is None and encoded is None:
        return layout.batches, np.ones(num_rows, dtype=bool)
    want = np.zeros(num_rows, dtype=bool) if needed is not None else np.ones(num_rows, dtype=bool)
    if needed is not None:
        want[needed] = True
    if encoded is not None:
        want &= ~encoded
    full = layout.batch_size
    batches: list[list[int]] = []
    pools: dict[object, list[int]] = {}  # the wanted rows of full batches, by group (image size)
    for batch in layout.batches:
        rows = [row for row in batch if want[row]]
        if not rows:
            continue
        if len(batch) < full:
            batches.append(batch)
        else:
            pools.setdefault(layout.sizes[batch[0]] if layout.sizes else None, []).extend(rows)
    for rows in pools.values():
        for start in range(0, len(rows), full):
            chunk = rows[start : start + full]
            batches.append(chunk + list(itertools.islice(itertools.cycle(chunk), full - len(chunk))))
    marked = np.zeros(num_rows, dtype=bool)
    for batch in batches:
        marked[batch] = True
    return batches, marked


def _encode_images(
    c: Components,
    recipe: Recipe,
    images: Dataset,
    layout: _Layout,
    batches: list[list[int]],
    arrays: list[np.ndarray],
    weight_dtype: torch.dtype,
    advance: Callable[[int], None],
    written: np.ndarray | None = None,
) -> None:
    """Encode these batches of rows into the (memory-mapped) latent arrays; rows `written` already (a
    top-up's batch may hold some) keep their latents. `advance(n)`: n more rows have latents."""
    shapes, offsets = layout.shapes, layout.offsets
    fit = None if shapes is not None else recipe.dataset.resolution  # bucketed rows keep their size
    for chunk in batches:
        part = images[chunk]
        pixels = torch.stack([to_pixels(im, fit) for im in part["image"]])
        m, s = encode_pixels(c, pixels.to(dtype=vae_dtype(recipe, weight_dtype)))
        found = [m.to(weight_dtype), s.to(weight_dtype)]
        if c.family.latent_control:  # the latents a step in reference mode makes of them
            channels = recipe.model.conditioning_channels
            cond = torch.stack([to_conditioning(im, fit, channels) for im in part["conditioning_image"]])
            found.append(c.family.control_latents(c, cond, weight_dtype))
        # Cast to the training dtype first, as a step in reference mode sees it.
        values_of = [x.float().cpu().numpy() for x in found]
        first = {row: i for i, row in reversed(list(enumerate(chunk)))}  # a repeated row: stored once
        new = [(row, i) for row, i in first.items() if written is None or not written[row]]
        consecutive = chunk == list(range(chunk[0], chunk[0] + len(chunk)))
        for array, values in zip(arrays, values_of, strict=True):
            if shapes is None and consecutive and len(new) == len(chunk):
                array[chunk[0] : chunk[-1] + 1] = values  # a layout batch: one slice
            else:
                for row, i in new:
                    _store(array, offsets, row, values[i])
        advance(len(new))
    for array in arrays:
        array.flush()


def _store(array: np.ndarray, offsets: np.ndarray | None, row: int, values: np.ndarray) -> None:
    if offsets is None:
        array[row] = values
    else:
        array[offsets[row] : offsets[row + 1]] = values.ravel()


def _encode_prompt_batches(
    c: Components, unique: list[str], starts: list[int], storage: np.dtype, advance: Callable[[int], None]
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray | None]]]:
    """(start, (embeddings, pooled or None)) of the prompt batches beginning at `starts`."""
    for start in starts:
        e, p = encode_prompts(c, unique[start : start + _PROMPT_BATCH])
        pooled = p.float().cpu().numpy().astype(storage) if p is not None else None
        yield start, (e.float().cpu().numpy().astype(storage), pooled)
        advance(min(_PROMPT_BATCH, len(unique) - start))


@torch.inference_mode()  # outputs go to numpy: no autograd bookkeeping at all (faster than no_grad)
def build_cache(
    c: Components,
    recipe: Recipe,
    rows: Dataset,
    folder: Path,
    weight_dtype: torch.dtype,
    console: Console | None = None,
    shard: Shard | None = None,
    needed: list[int] | None = None,
) -> EncodedCache:
    """Encode the rows of `rows` with the (already placed) VAE and text encoders into `folder`: every
    row, or those in `needed` (a run shorter than an epoch; `_to_encode`), adding to a cache that lacks
    some of them. With a `shard`, this process's batches of them, together with the other processes
    (every one calls this)."""
    cached = EncodedCache.open(folder)
    same = cached is not None and len(cached.prompt_index) == len(rows)  # else a stale one: replaced
    state = "new" if cached is None or not same else "top-up" if cached.missing(needed) else "reuse"
    if shard is not None:
        state = shard.share(state)  # rank 0 decides: every process takes the same path
    if state == "reuse":
        if console:
            console.print(f"[dim]precomputed latents and text embeddings: reusing {escape(str(folder))}[/]")
        cached = EncodedCache.open(folder)
        assert cached is not None
        return cached
    layout = _layout(c, recipe, rows)
    if state == "top-up":
        return _top_up(c, recipe, rows, folder, layout, needed, weight_dtype, console, shard)
    storage = _storage(weight_dtype)
    images = rows.select_columns(layout.columns)
    index, count = (shard.index, shard.count) if shard is not None else (0, 1)
    batches, marked = _to_encode(layout, len(rows), needed, None)
    mine = batches[index::count]
    to_encode = int(marked.sum())
    prompts = list(rows["prompt"])
    unique = list(dict.fromkeys(["", *prompts]))  # the empty prompt first: EncodedCache.EMPTY
    # Prompt batches are shared out as the image batches are (a T5 on every GPU, not one).
    prompt_batches = list(range(0, len(unique), _PROMPT_BATCH))
    my_prompts = prompt_batches[index::count]
    if index > 0:  # rank 0 allocated the arrays in its temporary folder and completes it
        assert shard is not None
        tmp = Path(shard.share(None))
        arrays = [np.lib.format.open_memmap(tmp / f"{name}.npy", "r+") for name in layout.arrays]
        _encode_images(c, recipe, images, layout, mine, arrays, weight_dtype, lambda _n: None)
        del arrays
        for start, (e, p) in _encode_prompt_batches(c, unique, my_prompts, storage, lambda _n: None):
            np.save(tmp / f"prompts-{start}.npy", e)  # gathered and removed by rank 0
            if p is not None:
                np.save(tmp / f"pooled-{start}.npy", p)
        shard.barrier()  # every process's latents and prompts are written
        shard.barrier()  # rank 0 renamed the folder: complete
        opened = EncodedCache.open(folder)
        assert opened is not None
        return opened
    where = {p: i for i, p in enumerate(unique)}
    warn_overlong(c, unique, console)
    latent_shape = layout.latent_shape
    with atomic_dir(folder) as tmp, _bar(console) as bar:
        arrays = [
            np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype=storage, shape=latent_shape)
            for name in layout.arrays
        ]
        if shard is not None:
            for array in arrays:
                array.flush()
            shard.share(str(tmp))
        advance = _progress(bar, console, to_encode, count)
        _encode_images(c, recipe, images, layout, mine, arrays, weight_dtype, advance)
        if to_encode < len(rows):
            np.save(tmp / "encoded.npy", marked)
        if layout.shapes is not None:
            np.save(tmp / "latent_offsets.npy", layout.offsets)
            np.save(tmp / "latent_shapes.npy", np.array(layout.shapes, dtype=np.int64))
        task = bar.add_task("encoding prompts", total=len(unique))
        ours = dict(
            _encode_prompt_batches(c, unique, my_prompts, storage, lambda n: bar.advance(task, n * count))
        )
        if shard is not None:
            shard.barrier()  # every process's latents and prompts are written
        embeds, pooled = [], []
        for start in prompt_batches:  # in order, whoever encoded them
            if start in ours:
                e, p = ours[start]
            else:
                e, p = np.load(tmp / f"prompts-{start}.npy"), None
                (tmp / f"prompts-{start}.npy").unlink()
                if (tmp / f"pooled-{start}.npy").is_file():
                    p = np.load(tmp / f"pooled-{start}.npy")
                    (tmp / f"pooled-{start}.npy").unlink()
            embeds.append(e)
            if p is not None:
                pooled.append(p)
        np.save(tmp / "prompt_embeds.npy", np.concatenate(embeds))
        if pooled:
            np.save(tmp / "pooled.npy", np.concatenate(pooled))
        np.save(tmp / "prompt_index.npy", np.array([where[p] for p in prompts], dtype=np.int32))
        meta = {"rows": len(rows), "unique_prompts": len(unique), "latent_shape": latent_shape[1:]}
        if layout.sizes is not None:
            meta["buckets"] = bucket_counts(layout.sizes)
        (tmp / "meta.json").write_text(json.dumps({**meta, "dtype": str(weight_dtype)}, indent=2))
    if shard is not None:
        shard.barrier()  # renamed: the others may open it
    if console:
        latents = f"{len(rows)}" if to_encode == len(rows) else f"{to_encode} of {len(rows)}"
        into = escape(str(folder))
        console.print(
            f"[dim]precomputed {latents} latents and {len(unique)} distinct prompts into {into}"
            + (f", shared by {count} processes" if count > 1 else "")
            + (" (the rows these steps draw)" if to_encode < len(rows) else "")
            + "[/]"
        )
    cache = EncodedCache.open(folder)
    assert cache is not None
    return cache


def _bar(console: Console | None) -> Progress:
    """The precompute's bar, on a terminal only: it is transient, and elsewhere (a pipe, log.txt,
    --json) `_progress`'s lines say the same; a stopped bar there left an empty line."""
    return Progress(console=console, disable=console is None or not console.is_terminal, transient=True)


def _progress(bar: Progress, console: Console | None, total: int, count: int) -> Callable[[int], None]:
    """`advance(n)` for this process's n more rows: the bar and the throttled lines of log.txt, a pipe,
    --json (the bar is transient)."""
    task = bar.add_task("encoding images", total=total)
    report = reporter(console)
    encoded = 0
    report.progress("precompute", encoded, total)

    def advance(n: int) -> None:
        nonlocal encoded
        n = min(n * count, total - encoded)  # the others' batches go at the same pace
        bar.advance(task, n)
        encoded += n
        report.progress("precompute", encoded, total)

    return advance


def _top_up(
    c: Components,
    recipe: Recipe,
    rows: Dataset,
    folder: Path,
    layout: _Layout,
    needed: list[int] | None,
    weight_dtype: torch.dtype,
    console: Console | None,
    shard: Shard | None,
) -> EncodedCache:
    """Encode into a cache an earlier, shorter run left partial the batches this run draws that it lacks.
    Rows are marked encoded only once written, by an atomic replace of encoded.npy: a killed top-up is
    redone, and no row that has latents is written again."""
    index, count = (shard.index, shard.count) if shard is not None else (0, 1)
    encoded = np.load(folder / "encoded.npy")
    batches, marked = _to_encode(layout, len(rows), needed, encoded)
    to_encode = int((marked & ~encoded).sum())
    images = rows.select_columns(layout.columns)
    arrays = [np.lib.format.open_memmap(folder / f"{name}.npy", "r+") for name in layout.arrays]
    with _bar(console) as bar:
        advance = _progress(bar, console, to_encode, count)
        _encode_images(
            c, recipe, images, layout, batches[index::count], arrays, weight_dtype, advance, encoded
        )
    del arrays  # flushed by _encode_images
    if shard is not None:
        shard.barrier()  # every process's rows are written
    if index == 0:
        with atomic_file(folder / "encoded.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, encoded | marked)
    if shard is not None:
        shard.barrier()  # marked: the others may open it
    if console:
        done = int((encoded | marked).sum())
        now = "every row now" if done == len(rows) else f"{done} of {len(rows)} rows now"
        console.print(f"[dim]precomputed {to_encode} more latents into {escape(str(folder))} ({now})[/]")
    cache = EncodedCache.open(folder)
    assert cache is not None
    return cache
