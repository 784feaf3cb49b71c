"""The FLUX.1 family (families/flux.py) on the builtin tiny FLUX.1: packed latents, guidance embedding and
flow matching as diffusers' train_controlnet_flux.py, through the same stages as SD 1.5."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline

from recipe_runner.errors import RecipeError, UserError
from recipe_runner.families import FAMILIES
from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.recipe.loader import load_recipe
from recipe_runner.recipe.model import guess_family
from recipe_runner.training import train_controlnet

FLUX = ("model.base=builtin:tiny-flux",)


def test_family_is_guessed_from_flux_names():
    for base in ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"):
        assert guess_family(base) == "flux"


def test_prompts_are_t5_tokens_and_the_clip_pooled_output(make_run):
    loaded, folder = make_run(*FLUX, name="text")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache), unet=False)
    embeds, pooled = c.family.encode_prompts(c, ["a red circle", "a blue square"])
    assert embeds.shape == (2, 512, 64) and pooled.shape == (2, 32)
    assert c.family.text_shape(c) == (512, 64, 32)
    assert not torch.equal(embeds[0], embeds[1])


def test_a_new_controlnet_copies_the_reference_block_counts_capped_by_the_transformer(make_run):
    loaded, folder = make_run(*FLUX, name="layers")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache))
    assert isinstance(c.controlnet, FluxControlNetModel)
    # The reference's 4 + 4, capped at the tiny transformer's 1 + 1.
    assert (c.controlnet.config.num_layers, c.controlnet.config.num_single_layers) == (1, 1)
    loaded, _ = make_run(*FLUX, "model.controlnet_single_layers=0", name="layers")
    single = load_components(
        loaded, resolve_base(loaded, folder.models_cache)
    ).controlnet.config.num_single_layers
    assert single == 0
    loaded, _ = make_run(*FLUX, "model.controlnet_layers=3", name="layers")
    with pytest.raises(UserError, match="has 1 such blocks"):
        load_components(loaded, resolve_base(loaded, folder.models_cache))


def test_the_prediction_is_unpacked_to_the_latents_shape_and_guidance_matters(make_run):
    from recipe_runner.training.step import StepInputs

    loaded, folder = make_run(*FLUX, name="predict")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache))
    torch.manual_seed(0)
    noisy = torch.randn(2, 16, 8, 8)
    embeds, pooled = c.family.encode_prompts(c, ["a", "b"])
    inputs = StepInputs(noisy, noisy, embeds, pooled, torch.rand(2, 3, 64, 64))
    # A trained ControlNet is not zero: perturb the new one's zero-initialised outputs.
    for p in c.controlnet.parameters():
        p.data += 0.01 * torch.randn_like(p)
    index = torch.tensor([100, 800])
    out = c.family.predict(c, c.controlnet, noisy, index, inputs, loaded.recipe, torch.float32)
    assert out.shape == noisy.shape
    loaded, _ = make_run(*FLUX, "train.flow_matching.guidance_scale=7", name="predict")
    other = c.family.predict(c, c.controlnet, noisy, index, inputs, loaded.recipe, torch.float32)
    assert not torch.allclose(out, other)
    b, ch, h, w = noisy.shape
    packed = FluxControlNetPipeline._pack_latents(noisy, b, ch, h, w)
    assert packed.shape == (2, 16, 64)  # 4x4 patches of 2x2x16
    assert torch.equal(FluxControlNetPipeline._unpack_latents(packed, 64, 64, 8), noisy)


def test_the_target_is_the_velocity_as_the_reference():
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from recipe_runner.recipe.train import FlowMatching

    recipe = SimpleNamespace(train=SimpleNamespace(flow_matching=FlowMatching()))
    c = SimpleNamespace(noise_scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    x, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    _, target = FAMILIES["flux"].noisy_and_target(c, x, noise, torch.tensor([3, 500]), recipe)
    assert torch.allclose(target, noise - x)  # train_controlnet_flux.py preconditions nothing


def test_tiny_flux_trains_validates_evaluates_and_resumes_bit_identically(make_run):
    loaded, straight = make_run(*FLUX, "train.max_steps=4", name="straight")
    results = train_controlnet(loaded, straight)
    assert results["steps"] == 4 and all(math.isfinite(v) for _, v in results["losses"])
    assert (straight.samples / "step-4.png").is_file()
    assert "- flux" in straight.model_card.read_text()

    loaded, short = make_run(*FLUX, "train.max_steps=2", "train.checkpoint_every=10", name="short")
    train_controlnet(loaded, short)
    loaded, _ = make_run(*FLUX, "train.max_steps=4", "train.checkpoint_every=10", name="short")
    assert train_controlnet(loaded, short, resume=True)["resumed_from"] == 2
    a = FluxControlNetModel.from_pretrained(short.controlnet).state_dict()
    b = FluxControlNetModel.from_pretrained(straight.controlnet).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_and_reference_mode_give_the_same_losses(make_run):
    losses = {}
    for precompute in (True, False):
        loaded, folder = make_run(
            *FLUX, "train.max_steps=3", f"train.precompute={str(precompute).lower()}", name=f"p-{precompute}"
        )
        losses[precompute] = [v for _, v in train_controlnet(loaded, folder)["losses"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.snr_gamma=5", "not for SD3 and FLUX.1"),
        ("model.t5=false", "applies only to SD3"),
        ("dataset.resolution=72", "no multiple of 16"),
    ],
)
def test_options_flux_does_not_take_are_refused_at_validation(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndataset: {source: {builtin: shapes}}\nmodel: {base: 'builtin:tiny-flux'}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert message in info.value.problems[0].message, info.value.problems


def test_single_layers_are_refused_for_sd3(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndataset: {source: {builtin: shapes}}\nmodel: {base: 'builtin:tiny-sd3'}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["model.controlnet_single_layers=2"])
    assert "applies only to FLUX.1" in info.value.problems[0].message


def test_an_sd3_folder_under_a_flux_recipe_is_named(make_run):
    loaded, folder = make_run("model.base=builtin:tiny-sd3", name="sd3")
    sd3 = resolve_base(loaded, folder.models_cache)
    loaded, _ = make_run(f"model.base={sd3}", "model.family=flux", name="as-flux")
    with pytest.raises(UserError, match="SD3Transformer2DModel"):
        load_components(loaded, sd3)


def test_plan_sizes_the_controlnet_by_its_blocks_and_offers_fewer_for_flux_dev(tmp_path):
    """FLUX.1-dev does not fit 24 GB with the low-VRAM preset alone: plan names the fp8 base and a smaller
    ControlNet, whose block counts its estimate follows."""
    from recipe_runner.run.estimates import estimate_memory, memory_savers

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndataset: {source: {builtin: shapes}, resolution: 1024}\n"
        "model: {base: black-forest-labs/FLUX.1-dev}\ntrain: {max_steps: 2}\n"
    )
    default = load_recipe(path).recipe
    small = load_recipe(path, ["model.controlnet_layers=2", "model.controlnet_single_layers=0"]).recipe
    assert estimate_memory(default).sizes.controlnet == pytest.approx(2.05e9, rel=0.01)
    assert estimate_memory(small).sizes.controlnet == pytest.approx(0.74e9, rel=0.01)
    savers, lighter = memory_savers(default)
    assert any(s.startswith("train.fp8_base: true (the frozen transformer") for s in savers), savers
    assert any(
        s.startswith("model.controlnet_layers: 2 with model.controlnet_single_layers: 0") for s in savers
    )
    assert (lighter.model.controlnet_layers, lighter.model.controlnet_single_layers) == (2, 0)
    assert estimate_memory(lighter).total_gb < 24
    assert memory_savers(small)[1].model.controlnet_layers == 2  # nothing more to offer there
    assert not any("controlnet_layers" in s for s in memory_savers(small)[0])
