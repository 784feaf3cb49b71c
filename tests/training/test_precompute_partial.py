"""A run shorter than an epoch encodes only the rows its steps draw; a longer run in the same folder
encodes the rest. Either way each row gets the latents a full precompute gives it, so training is
bit-identical to a run whose cache holds every row."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from rich.console import Console

from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.training import precompute
from recipe_runner.training.data import batch_plan, load_rows
from recipe_runner.training.stage import prepare_training, train_controlnet
from tests.training.test_precompute_shared import _ranks

ARRAYS = ("latent_mean", "latent_std", "prompt_embeds", "prompt_index")


def _cache(folder) -> precompute.EncodedCache:
    (path,) = [p for p in folder.cache.iterdir() if not p.name.startswith(".")]
    cache = precompute.EncodedCache.open(path)
    assert cache is not None
    return cache


def _console() -> Console:
    return Console(file=io.StringIO(), width=300)


def _said(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def _weights(folder) -> bytes:
    return (folder.controlnet / "diffusion_pytorch_model.safetensors").read_bytes()


def _encoders(make_run, shapes_data, name: str):
    """A one-step recipe on the 8 rows (batch 2), its run folder, encoders and train rows."""
    loaded, folder = make_run("train.max_steps=1", name=name, data=shapes_data)
    c = load_components(loaded, resolve_base(loaded, folder.models_cache), unet=False)
    return loaded, folder, c, load_rows(folder.dataset_data, loaded.recipe)["train"]


def _drawn(loaded, rows, steps: int) -> np.ndarray:
    drawn = batch_plan(loaded.recipe, rows, 1, 0).rows_drawn(steps)
    assert drawn is not None
    marked = np.zeros(len(rows), dtype=bool)
    marked[drawn] = True
    return marked


@pytest.mark.parametrize("batch", [2, 3])  # 3: a short last batch (rows 6, 7) of the full precompute
def test_a_short_run_encodes_the_rows_it_draws_and_trains_as_with_every_row(make_run, shapes_data, batch):
    # 8 rows: one step draws `batch` of them.
    size = f"train.batch_size={batch}"
    short, folder = make_run("train.max_steps=1", size, name="short", data=shapes_data)
    results = train_controlnet(short, folder, console=(console := _console()))
    cache = _cache(folder)
    rows = load_rows(folder.dataset_data, short.recipe)["train"]
    assert cache.encoded is not None
    drawn = _drawn(short, rows, 1)
    if batch == 3 and drawn[6:].any():  # the short batch is encoded whole, as a full precompute does
        drawn[6:] = True
    assert np.array_equal(cache.encoded, drawn)
    assert f"precomputed {drawn.sum()} of 8 latents" in _said(console)
    assert results["precomputed_rows"] == drawn.sum()  # in run.lock.json's train stage

    full_recipe, full = make_run("train.max_steps=1", size, name="full", data=shapes_data)
    prepare_training(full_recipe, full, precompute=True)  # every row, as a longer run encodes them
    assert _cache(full).encoded is None
    assert train_controlnet(full_recipe, full)["precomputed_rows"] == 8
    assert _weights(folder) == _weights(full)
    whole = _cache(full)
    done = np.flatnonzero(cache.encoded)
    for name in ("latent_mean", "latent_std"):
        assert np.array_equal(getattr(cache, name)[done], getattr(whole, name)[done]), name
    for name in ("prompt_embeds", "prompt_index"):
        assert np.array_equal(getattr(cache, name), getattr(whole, name)), name


def test_a_longer_run_encodes_the_rest_into_the_same_cache_and_resumes_exactly(make_run, shapes_data):
    loaded, folder = make_run("train.max_steps=1", "train.checkpoint_every=1", name="grown", data=shapes_data)
    train_controlnet(loaded, folder)
    first = _cache(folder)
    assert first.encoded is not None and not first.encoded.all()
    kept = {name: np.array(getattr(first, name)[first.encoded]) for name in ("latent_mean", "latent_std")}

    longer, folder = make_run("train.max_steps=6", "train.checkpoint_every=1", name="grown")
    train_controlnet(longer, folder, resume=True, console=(console := _console()))  # 12 draws of 8 rows
    grown = _cache(folder)
    assert grown.folder == first.folder and grown.encoded is not None and grown.encoded.all()
    assert "more latents" in _said(console) and "(every row now)" in _said(console)
    for name, values in kept.items():  # rows that had latents were not written again
        assert np.array_equal(getattr(grown, name)[first.encoded], values), name

    straight_recipe, straight = make_run("train.max_steps=6", "train.checkpoint_every=1", name="straight")
    train_controlnet(straight_recipe, straight)
    assert _weights(folder) == _weights(straight)


def test_a_killed_top_up_marks_nothing_and_is_done_again(make_run, shapes_data, monkeypatch):
    loaded, folder, c, rows = _encoders(make_run, shapes_data, "killed")
    path = folder.cache / "k"
    needed = batch_plan(loaded.recipe, rows, 1, 0).rows_drawn(1)
    before = precompute.build_cache(c, loaded.recipe, rows, path, torch.float32, needed=needed)
    marked = np.array(before.encoded)

    real = precompute._encode_images

    def dies_after_one_batch(*args, **kwargs):
        args = list(args)
        args[4] = args[4][:1]  # this process's batches: the first one only
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute, "_encode_images", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        precompute.build_cache(c, loaded.recipe, rows, path, torch.float32)
    assert np.array_equal(np.load(path / "encoded.npy"), marked)
    assert [p.name for p in path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left
    monkeypatch.setattr(precompute, "_encode_images", real)

    done = precompute.build_cache(c, loaded.recipe, rows, path, torch.float32)
    whole = precompute.build_cache(c, loaded.recipe, rows, folder.cache / "whole", torch.float32)
    assert done.encoded is not None and done.encoded.all() and whole.encoded is None
    for name in ARRAYS:
        assert np.array_equal(getattr(done, name), getattr(whole, name)), name


def test_processes_share_a_partial_precompute(make_run, shapes_data):
    loaded, folder, c, rows = _encoders(make_run, shapes_data, "ranks")
    needed = batch_plan(loaded.recipe, rows, 2, 0).rows_drawn(1)  # one micro-step of both processes
    assert needed is not None and len(needed) == 4
    alone = precompute.build_cache(
        c, loaded.recipe, rows, folder.cache / "alone", torch.float32, needed=needed
    )
    results: dict[int, object] = {}

    def rank(shard: precompute.Shard) -> None:
        try:
            results[shard.index] = precompute.build_cache(
                c, loaded.recipe, rows, folder.cache / "shared", torch.float32, None, shard, needed
            )
        except BaseException as e:  # surfaced below, not lost in the thread
            results[shard.index] = e

    for call in range(2):  # a new cache, then a top-up of every row
        threads = [threading.Thread(target=rank, args=(s,)) for s in _ranks(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(isinstance(r, BaseException) for r in results.values()), results
        shared = results[0]
        assert isinstance(shared, precompute.EncodedCache) and shared.encoded is not None
        if call == 0:
            assert alone.encoded is not None and np.array_equal(shared.encoded, alone.encoded)
            for name in ARRAYS:
                assert np.array_equal(getattr(shared, name), getattr(alone, name)), name
            needed = None
    assert shared.encoded.all()
    whole = precompute.build_cache(c, loaded.recipe, rows, folder.cache / "whole", torch.float32)
    for name in ARRAYS:
        assert np.array_equal(getattr(shared, name), getattr(whole, name)), name


def test_latents_of_a_row_never_encoded_are_refused(make_run, shapes_data):
    loaded, folder, c, rows = _encoders(make_run, shapes_data, "refused")
    cache = precompute.build_cache(c, loaded.recipe, rows, folder.cache / "c", torch.float32, needed=[0])
    assert cache.encoded is not None and cache.encoded.tolist() == [True] + [False] * 7
    cache.latents(np.array([0, 0]))
    with pytest.raises(RuntimeError, match=r"no latents for rows \[1\]"):
        cache.latents(np.array([0, 1]))


def test_rows_are_encoded_in_batches_of_the_size_a_full_precompute_uses() -> None:
    layout = precompute._Layout((7, 4, 8, 8), [[0, 1, 2], [3, 4, 5], [6]], 3, None, None, None, [], [])
    batches, marked = precompute._to_encode(layout, 7, [1, 4, 6], None)
    assert batches == [[6], [1, 4, 1]]  # the short batch whole; the others' rows filled up to 3
    assert np.flatnonzero(marked).tolist() == [1, 4, 6]
    batches, _ = precompute._to_encode(layout, 7, None, marked)  # a top-up of every other row
    assert batches == [[0, 2, 3], [5, 5, 5]]
    sizes = [(64, 64)] * 3 + [(64, 128)] * 3 + [(64, 64)]  # buckets: rows of one size per batch
    layout = precompute._Layout((0,), [[0, 1, 2], [6], [3, 4, 5]], 3, sizes, None, None, [], [])
    assert precompute._to_encode(layout, 7, [0, 3, 6], None)[0] == [[6], [0, 0, 0], [3, 3, 3]]
