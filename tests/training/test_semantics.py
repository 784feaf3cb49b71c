"""The loss semantics of diffusers' train_controlnet(_sdxl).py: precompute, v-prediction, empty prompts, SDXL."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from recipe_runner.families.loading import resolve_base
from recipe_runner.training import step, train_controlnet


def _record_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    prompts: list[str] = []
    encode = step.encode_prompts

    def recording(c, texts):
        prompts.extend(texts)
        return encode(c, texts)

    monkeypatch.setattr(step, "encode_prompts", recording)
    return prompts


def test_precompute_gives_the_reference_loss(make_run, monkeypatch: pytest.MonkeyPatch):
    """The cache stores the latent distribution and every prompt's embedding (and the empty one's), so
    with the same per-step draws both modes see the same latents, text and targets; only batched float
    arithmetic differs."""
    prompts = _record_prompts(monkeypatch)
    losses = {}
    for precompute in (True, False):
        loaded, folder = make_run(
            "train.max_steps=2",
            "train.empty_prompt_ratio=0.5",
            f"train.precompute={str(precompute).lower()}",
            name=f"precompute-{precompute}",
        )
        results = train_controlnet(loaded, folder)
        assert results["precomputed"] is precompute
        losses[precompute] = [loss for _, loss in results["losses"]]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-3)
    assert "" in prompts[-4:] and any(prompts[-4:])  # reference mode: some prompts replaced by ""


def test_empty_prompt_ratio_one_trains_without_prompts(make_run, monkeypatch: pytest.MonkeyPatch):
    prompts = _record_prompts(monkeypatch)
    loaded, folder = make_run("train.max_steps=2", "train.empty_prompt_ratio=1.0", "train.precompute=false")
    results = train_controlnet(loaded, folder)
    assert math.isfinite(results["final_loss"])
    assert prompts[:4] == ["", "", "", ""]  # the training steps (validation prompts come after)


def test_v_prediction_trains_against_the_velocity(make_run, monkeypatch: pytest.MonkeyPatch, tmp_path):
    loaded, folder = make_run()
    vpred = tmp_path / "tiny-sd-v"
    shutil.copytree(resolve_base(loaded, folder.models_cache), vpred)
    config_file = vpred / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))

    calls = []
    velocity = DDPMScheduler.get_velocity

    def recording(self, sample, noise, timesteps):
        calls.append(len(sample))
        return velocity(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", recording)
    loaded, folder = make_run("train.max_steps=2", f"model.base={vpred}", "model.family=sd2", name="vpred")
    results = train_controlnet(loaded, folder)
    assert calls == [2, 2] and math.isfinite(results["final_loss"])


def test_tiny_sdxl_trains_two_steps(make_run):
    loaded, folder = make_run(
        "train.max_steps=2",
        "model.base=builtin:tiny-sdxl",
        "train.micro_conditioning={crops_coords_top_left: [0, 0]}",
    )
    results = train_controlnet(loaded, folder)
    assert results["steps"] == 2 and math.isfinite(results["final_loss"])
    assert (folder.controlnet / "config.json").is_file()
    config = json.loads((folder.controlnet / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time"
    assert (folder.samples / "step-2.png").is_file()


@pytest.mark.parametrize(
    "overrides",
    [("model.base=builtin:tiny-sd",), ("model.base=builtin:tiny-sdxl", "train.precompute=false")],
    ids=["sd-precomputed", "sdxl-reference"],
)
def test_bf16_mixed_precision_keeps_fp32_master_weights(make_run, overrides):
    loaded, folder = make_run("train.max_steps=2", "train.mixed_precision=bf16", *overrides)
    results = train_controlnet(loaded, folder)
    assert math.isfinite(results["final_loss"]) and (folder.samples / "step-2.png").is_file()
    weights = load_file(folder.controlnet / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_validation_uses_the_recipe_prompts_and_images(make_run, tmp_path):
    from PIL import Image

    from recipe_runner.data.builtin_shapes import make_sample

    make_sample(3, seed=1, resolution=64)["conditioning_image"].save(tmp_path / "edges.png")
    loaded, folder = make_run(
        "train.max_steps=1",
        "train.validation.prompts=[a red circle, a blue star]",
        "train.validation.conditioning_images=[edges.png]",  # relative to the recipe, one for both
        "train.validation.num_images=2",
    )
    results = train_controlnet(loaded, folder)
    grid = Image.open(results["sample_grid"])
    assert grid.width == 3 * 64 and grid.height > 2 * 64  # two rows of condition + 2 images, captions


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "reference"])
def test_over_long_prompts_are_reported_in_both_modes(make_run, shapes_data, tmp_path, caplog, precompute):
    """The text encoder sees 77 tokens at most; truncating silently in one mode would hide it."""
    from datasets import load_from_disk

    data = load_from_disk(str(shapes_data))
    long = " ".join(["a small red circle on a blue background"] * 12)
    data["train"] = data["train"].map(
        lambda row, i: {"prompt": long if i == 0 else row["prompt"]}, with_indices=True
    )
    data.save_to_disk(str(tmp_path / "long-data"))
    loaded, folder = make_run(
        "train.max_steps=1",
        f"train.precompute={str(precompute).lower()}",
        name="long",
        data=tmp_path / "long-data",
    )
    train_controlnet(loaded, folder)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("1 of ") and "77 tokens" in warnings[0]
