"""Training on aspect-ratio buckets: batch plans, the latent cache, resume, SDXL's size conditioning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recipe_runner.families import stable_diffusion as sd_family
from recipe_runner.training import step as step_module
from recipe_runner.training import train_controlnet
from recipe_runner.training.data import BatchPlan, BucketPlan
from recipe_runner.training.precompute import EncodedCache

BUCKETS = ("dataset.buckets={enabled: true, step: 16}",)
SIZES = [(48, 80), (64, 64), (80, 48)]  # the buckets of resolution 64, step 16, max_aspect 2


@pytest.fixture(scope="module")
def bucketed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built dataset whose rows have the three bucket sizes (5, 4 and 3 rows), as the build writes it."""
    from datasets import Dataset, DatasetDict, Image

    from recipe_runner.data.builtin_shapes import make_sample

    sizes = [SIZES[0]] * 5 + [SIZES[1]] * 4 + [SIZES[2]] * 3
    rows = {"image": [], "conditioning_image": [], "prompt": []}
    for i, size in enumerate(sizes):
        sample = make_sample(i, seed=0, resolution=64)
        rows["image"].append(sample["image"].resize(size))
        rows["conditioning_image"].append(sample["conditioning_image"].resize(size))
        rows["prompt"].append(sample["prompt"])
    train = Dataset.from_dict(rows).cast_column("image", Image()).cast_column("conditioning_image", Image())
    folder = tmp_path_factory.mktemp("bucketed") / "data"
    DatasetDict({"train": train}).save_to_disk(str(folder))
    return folder


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder.controlnet / "diffusion_pytorch_model.safetensors")


def test_every_global_batch_comes_from_one_bucket_and_each_epoch_covers_every_row():
    sizes = tuple([SIZES[0]] * 5 + [SIZES[1]] * 4 + [SIZES[2]] * 3)
    plan = BucketPlan(len(sizes), 2, 2, 0, seed=3, sizes=sizes)
    # 5 rows pad to 8, 4 stay 4, 3 pad to 4: 16 rows in 4 global batches of 4.
    assert plan.padded_rows == 16 and plan.batches_per_epoch == 4
    for epoch in range(3):
        order = plan.epoch_order(epoch).tolist()
        assert set(order) == set(range(len(sizes)))
        for k in range(plan.batches_per_epoch):
            batch = order[k * 4 : (k + 1) * 4]
            assert len({sizes[r] for r in batch}) == 1, (epoch, k, batch)
    assert plan.epoch_order(0).tolist() != plan.epoch_order(1).tolist()
    assert (
        plan.epoch_order(1).tolist() == BucketPlan(12, 2, 2, 0, seed=3, sizes=sizes).epoch_order(1).tolist()
    )


def test_two_processes_split_the_batch_one_process_trains_on():
    """Rank r takes the r-th half of the same global batch, at the same global positions (which seed the
    noise), so 2 processes x batch 1 train on exactly what 1 process x batch 2 does."""
    sizes = tuple([SIZES[0]] * 3 + [SIZES[2]] * 4)
    one = BucketPlan(len(sizes), 2, 1, 0, seed=0, sizes=sizes)
    ranks = [BucketPlan(len(sizes), 1, 2, r, seed=0, sizes=sizes) for r in (0, 1)]
    order = one.epoch_order(0)
    assert torch.equal(order, ranks[0].epoch_order(0))
    for k in range(one.batches_per_epoch):
        rows, positions = one.batch(order, k)
        shares = [p.batch(order, k) for p in ranks]
        assert rows == shares[0][0] + shares[1][0] and positions == shares[0][1] + shares[1][1]


def test_a_square_dataset_keeps_its_batch_plan(make_run):
    """Bucketing off: the plan (and so every batch of existing recipes) is the one from before buckets."""
    from recipe_runner.training.data import batch_plan

    loaded, _ = make_run()
    plan = batch_plan(loaded.recipe, list(range(10)), 1, 0)
    assert type(plan) is BatchPlan and plan.num_rows == 10


def test_the_flat_latent_cache_gives_each_row_its_own_shape(tmp_path):
    shapes = np.array([(4, 10, 6), (4, 8, 8), (4, 10, 6)])
    offsets = np.concatenate([[0], np.cumsum([math.prod(s) for s in shapes])])
    mean = np.arange(offsets[-1], dtype=np.float32)
    cache = EncodedCache(tmp_path, mean, -mean, np.zeros((1, 1)), np.zeros(3, int), None, offsets, shapes)
    m, s = cache.latents(np.array([2, 0]))
    assert m.shape == (2, 4, 10, 6) and m.flags["C_CONTIGUOUS"]
    assert np.array_equal(m[0].ravel(), mean[offsets[2] : offsets[3]])
    assert np.array_equal(m[1].ravel(), mean[: offsets[1]]) and np.array_equal(s, -m)


def test_bucketed_training_resumes_bit_identically(straight_and_resumed, bucketed_data):
    straight, _ = straight_and_resumed(*BUCKETS, data=bucketed_data)
    meta = (next(straight.cache.iterdir()) / "meta.json").read_text()
    assert '"48x80": 5' in meta and '"80x48": 3' in meta


def test_bucketed_precompute_gives_the_reference_loss(make_run, bucketed_data, monkeypatch):
    """Each batch's latents come from the flat cache at that batch's size: the same loss as encoding the
    batch's images at every step (the reference)."""
    shapes = []
    loss = step_module.controlnet_loss

    def recording(c, controlnet, inputs, draws, recipe, dtype):
        shapes.append(tuple(inputs.latent_mean.shape[-2:]))
        return loss(c, controlnet, inputs, draws, recipe, dtype)

    monkeypatch.setattr("recipe_runner.training.loop.controlnet_loss", recording)
    losses = {}
    for precompute in (True, False):
        loaded, folder = make_run(
            *BUCKETS,
            "train.max_steps=3",
            f"train.precompute={str(precompute).lower()}",
            name=f"precompute-{precompute}",
            data=bucketed_data,
        )
        losses[precompute] = [v for _, v in train_controlnet(loaded, folder)["losses"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert shapes[:3] == shapes[3:] and len(set(shapes)) > 1  # several buckets, the same in both modes


def test_sdxl_size_conditioning_is_the_bucket_size(make_run, bucketed_data, monkeypatch):
    sizes = []
    add_time_ids = sd_family.add_time_ids

    def recording(recipe, batch, device, dtype, size=None):
        sizes.append(size)
        return add_time_ids(recipe, batch, device, dtype, size)

    monkeypatch.setattr(sd_family, "add_time_ids", recording)
    loaded, folder = make_run(
        *BUCKETS, "train.max_steps=4", "model.base=builtin:tiny-sdxl", name="sdxl", data=bucketed_data
    )
    assert math.isfinite(train_controlnet(loaded, folder)["final_loss"])
    assert set(sizes) <= {(h, w) for w, h in SIZES} and len(set(sizes)) > 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_on_buckets(make_run, bucketed_data):
    """Both ranks take halves of one bucket's global batch: the same losses and weights as one process."""
    loaded, one = make_run(
        *BUCKETS, "train.max_steps=3", "train.batch_size=4", name="one", data=bucketed_data
    )
    single = train_controlnet(loaded, one)
    loaded, two = make_run(
        *BUCKETS,
        "train.max_steps=3",
        "train.batch_size=2",
        "launch.num_processes=2",
        name="two",
        data=bucketed_data,
    )
    double = train_controlnet(loaded, two)
    assert double["processes"] == 2
    for (_, a), (_, b) in zip(single["losses"], double["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    a, b = _weights(one), _weights(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_a_dataset_built_with_other_buckets_is_refused_before_training(make_run, bucketed_data):
    from recipe_runner.errors import UserError

    # resolution 48 has the buckets 32x64, 48x48 and 64x32: the built 48x80 rows are none of them.
    loaded, folder = make_run(*BUCKETS, "dataset.resolution=48", name="other", data=bucketed_data)
    with pytest.raises(
        UserError, match=r"48x80 px image, which is none of dataset.buckets' sizes \(32x64 48x48"
    ):
        train_controlnet(loaded, folder)


@pytest.mark.parametrize("base", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_flow_families_take_the_sd15_options_on_buckets(make_run, bucketed_data, base):
    """What SD 1.5 runs with also runs for SD3 and FLUX.1: buckets (their latents in 2x2 patches), EMA,
    8-bit AdamW, gradient checkpointing, offset noise, empty prompts."""
    options = (
        *BUCKETS,
        f"model.base={base}",
        "train.max_steps=3",
        "train.ema_decay=0.9",
        "train.optimizer=adamw_8bit",
        "train.gradient_checkpointing=true",
        "train.noise_offset=0.05",
        "train.empty_prompt_ratio=0.5",
    )
    loaded, folder = make_run(*options, name="flow", data=bucketed_data)
    results = train_controlnet(loaded, folder)
    assert results["steps"] == 3 and all(math.isfinite(v) for _, v in results["losses"])
    assert (folder.controlnet / "config.json").is_file()
