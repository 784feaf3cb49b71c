"""A precompute shared by several processes (launch.num_processes > 1): each encodes every other batch
into the one cache rank 0 allocates and completes. Two threads stand in for the two processes here (the
launched version is in test_multiprocess.py, marked slow)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.training import precompute
from recipe_runner.training.data import load_rows


def _ranks(count: int) -> list[precompute.Shard]:
    barrier = threading.Barrier(count, timeout=120)
    slot: dict[str, object] = {}

    def share_for(rank: int):
        def share(value):  # rank 0's value, to everyone (as accelerate's broadcast_object_list)
            if rank == 0:
                slot["value"] = value
            barrier.wait()
            value = slot["value"]
            barrier.wait()  # every rank has read it before the next call overwrites it
            return value

        return share

    return [precompute.Shard(r, count, barrier.wait, share_for(r)) for r in range(count)]


def test_a_shared_precompute_encodes_every_other_batch_per_rank_into_one_cache(
    make_run, shapes_data, monkeypatch
):
    loaded, folder = make_run("train.batch_size=2", name="shared", data=shapes_data)
    c = load_components(loaded, resolve_base(loaded, folder.models_cache), unet=False)
    rows = load_rows(folder.dataset_data, loaded.recipe)["train"]  # 8 rows: 4 batches of 2
    monkeypatch.setattr(precompute, "_PROMPT_BATCH", 2)  # the rows' prompts in several batches
    alone = precompute.build_cache(c, loaded.recipe, rows, folder.cache / "alone", torch.float32)

    encoded: dict[str, list[int]] = {}
    prompted: dict[str, int] = {}
    real_pixels, real_prompts = precompute.encode_pixels, precompute.encode_prompts

    def pixels(c, pixels):
        encoded.setdefault(threading.current_thread().name, []).append(len(pixels))
        return real_pixels(c, pixels)

    def prompts(c, prompts):
        name = threading.current_thread().name
        prompted[name] = prompted.get(name, 0) + 1
        return real_prompts(c, prompts)

    monkeypatch.setattr(precompute, "encode_pixels", pixels)
    monkeypatch.setattr(precompute, "encode_prompts", prompts)
    results: dict[int, object] = {}

    def rank(shard: precompute.Shard) -> None:
        try:
            results[shard.index] = precompute.build_cache(
                c, loaded.recipe, rows, folder.cache / "shared", torch.float32, None, shard
            )
        except BaseException as e:  # surfaced below, not lost in the thread
            results[shard.index] = e

    threads = [threading.Thread(target=rank, args=(s,), name=f"rank{s.index}") for s in _ranks(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert encoded == {"rank0": [2, 2], "rank1": [2, 2]}  # batches 0, 2 and 1, 3
    batches = -(-len(alone.prompt_embeds) // 2)
    assert prompted == {"rank0": -(-batches // 2), "rank1": batches // 2} and batches >= 3
    assert {r.folder for r in results.values()} == {folder.cache / "shared"}
    assert sorted(p.name for p in folder.cache.iterdir()) == ["alone", "shared"]  # no temporaries
    shared = results[0]
    for name in ("latent_mean", "latent_std", "prompt_embeds", "prompt_index", "pooled"):
        assert np.array_equal(getattr(alone, name), getattr(shared, name)), name

    # A second call finds it complete on every rank, and nobody encodes anything.
    encoded.clear()
    threads = [threading.Thread(target=rank, args=(s,), name=f"rank{s.index}") for s in _ranks(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert encoded == {} and {r.folder for r in results.values()} == {folder.cache / "shared"}
    assert sorted(p.name for p in (folder.cache / "shared").iterdir()) == sorted(
        p.name for p in (folder.cache / "alone").iterdir()
    )  # the prompt parts gathered and removed
