"""The precompute cache: VAE latent distributions and text embeddings of every train row, computed once.

Steps then run only the UNet and the ControlNet. Arrays are .npy files opened with mmap (a big dataset's
latents need not fit in RAM) under `cache/<key>/`, where the key hashes everything they depend on; a
folder only gets its final name once complete (runfolder/atomic.py), so a killed precompute is redone.
"""

from __future__ import annotations

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
from recipe_runner.runfolder.atomic import atomic_dir, is_complete
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

    EMPTY = 0

    def latents(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of these rows, stacked: (len(rows), C, h, w), contiguous in memory."""
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
    return _Layout(latent_shape, batches, sizes, shapes, offsets, arrays, columns)


def _encode_images(
    c: Components,
    recipe: Recipe,
    images: Dataset,
    layout: _Layout,
    batches: list[list[int]],
    arrays: list[np.ndarray],
    weight_dtype: torch.dtype,
    advance: Callable[[int], None],
) -> None:
    """Encode these batches of rows into the (memory-mapped) latent arrays."""
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
        for array, values in zip(arrays, values_of, strict=True):
            if shapes is None:
                array[chunk[0] : chunk[-1] + 1] = values
            else:
                assert offsets is not None
                for i, row in enumerate(chunk):
                    array[offsets[row] : offsets[row + 1]] = values[i].ravel()
        advance(len(chunk))
    for array in arrays:
        array.flush()


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
) -> EncodedCache:
    """Encode every row of `rows` with the (already placed) VAE and text encoders into `folder`; with a
    `shard`, this process's batches of them, together with the other processes (every one calls this)."""
    cached = EncodedCache.open(folder)
    complete = cached is not None and len(cached.prompt_index) == len(rows)
    if shard is not None:
        complete = shard.share(complete)  # rank 0 decides: every process takes the same path
    if complete:
        if console:
            console.print(f"[dim]precomputed latents and text embeddings: reusing {escape(str(folder))}[/]")
        cached = EncodedCache.open(folder)
        assert cached is not None
        return cached
    layout = _layout(c, recipe, rows)
    storage = _storage(weight_dtype)
    images = rows.select_columns(layout.columns)
    index, count = (shard.index, shard.count) if shard is not None else (0, 1)
    mine = layout.batches[index::count]
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
    with atomic_dir(folder) as tmp, Progress(console=console, disable=console is None, transient=True) as bar:
        arrays = [
            np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype=storage, shape=latent_shape)
            for name in layout.arrays
        ]
        if shard is not None:
            for array in arrays:
                array.flush()
            shard.share(str(tmp))
        task = bar.add_task("encoding images", total=len(rows))
        report = reporter(console)  # the throttled lines of log.txt, a pipe, --json (bar is transient)
        encoded = 0
        report.progress("precompute", encoded, len(rows))

        def advance(n: int) -> None:
            nonlocal encoded
            n = min(n * count, len(rows) - encoded)  # the others' batches go at the same pace
            bar.advance(task, n)
            encoded += n
            report.progress("precompute", encoded, len(rows))

        _encode_images(c, recipe, images, layout, mine, arrays, weight_dtype, advance)
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
        console.print(
            f"[dim]precomputed {len(rows)} latents and {len(unique)} distinct prompts into {folder}"
            + (f", shared by {count} processes" if count > 1 else "")
            + "[/]"
        )
    cache = EncodedCache.open(folder)
    assert cache is not None
    return cache
