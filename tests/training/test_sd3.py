"""The SD3 family (families/sd3.py) on the builtin tiny SD3: flow matching as diffusers'
train_controlnet_sd3.py, through the same stages, resume, validation and recipe checks as SD 1.5."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel
from diffusers.training_utils import compute_density_for_timestep_sampling

from recipe_runner.errors import RecipeError
from recipe_runner.families import FAMILIES, family_of
from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.recipe.loader import load_recipe
from recipe_runner.recipe.model import guess_family
from recipe_runner.recipe.train import FlowMatching
from recipe_runner.training import train_controlnet

SD3 = ("model.base=builtin:tiny-sd3",)


def _recipe(**flow):
    """A recipe object with `train.flow_matching` set (only its flow settings are read)."""
    from types import SimpleNamespace

    return SimpleNamespace(train=SimpleNamespace(flow_matching=FlowMatching(**flow)))


@pytest.mark.parametrize(
    ("scheme", "mean"),
    [("logit_normal", 0.5), ("mode", None), ("none", 0.5), ("cosmap", 0.5)],
)
def test_timesteps_are_drawn_from_the_schemes_density(scheme, mean):
    """Our per-sample draw against diffusers' compute_density_for_timestep_sampling (global generator):
    the same distribution of timestep indices."""
    sample = FAMILIES["sd3"].timestep_sampler(_recipe(weighting_scheme=scheme), 1000)
    ours = torch.cat([sample(torch.Generator().manual_seed(i)) for i in range(4000)]).float() / 1000
    torch.manual_seed(0)
    theirs = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=4000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    assert ours.min() >= 0 and ours.max() < 1
    assert ours.mean().item() == pytest.approx(theirs.mean().item(), abs=0.02)
    assert ours.std().item() == pytest.approx(theirs.std().item(), abs=0.02)
    if mean is not None:
        assert ours.mean().item() == pytest.approx(mean, abs=0.02)


def test_flow_matching_input_target_and_preconditioning():
    """z_t = (1 - sigma) x + sigma noise at the drawn index's sigma; the target is x with
    preconditioning (the prediction becomes -sigma * out + z_t), noise - x without."""
    from types import SimpleNamespace

    family = FAMILIES["sd3"]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    c = SimpleNamespace(noise_scheduler=scheduler)
    x, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    index = torch.tensor([0, 700])
    sigma = scheduler.sigmas[index].reshape(2, 1, 1, 1)
    noisy, target = family.noisy_and_target(c, x, noise, index, _recipe())
    assert torch.allclose(noisy, (1 - sigma) * x + sigma * noise)
    assert torch.equal(target, x)
    _, velocity = family.noisy_and_target(c, x, noise, index, _recipe(precondition_outputs=False))
    assert torch.allclose(velocity, noise - x)
    assert family.loss_weights(c, index, _recipe()) is None
    cosmap = family.loss_weights(c, index, _recipe(weighting_scheme="cosmap"))
    s = scheduler.sigmas[index]
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * s + 2 * s**2)))


def test_control_latents_are_shifted_and_scaled_like_the_image_latents(make_run, tmp_path):
    """diffusers #11867/#11917: the control latents missed the VAE's shift factor. Ours are
    (mean - shift) * scale, the image latents' transform (sample_latents)."""
    from recipe_runner.training.encoding import encode_pixels, sample_latents

    loaded, folder = make_run(*SD3, name="latents")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache), unet=False)
    assert c.vae.config.shift_factor and c.vae.config.latent_channels == 16
    image = torch.rand(1, 3, 64, 64)
    control = c.family.control_latents(c, image, torch.float32)
    mean, std = encode_pixels(c, image * 2 - 1)
    assert torch.allclose(control, sample_latents(c, mean, std, torch.zeros_like(mean)), atol=1e-6)
    assert torch.allclose(control, (mean - c.vae.config.shift_factor) * c.vae.config.scaling_factor)


def test_tiny_sd3_trains_validates_and_resumes_bit_identically(make_run):
    loaded, straight = make_run(*SD3, "train.max_steps=4", name="straight")
    results = train_controlnet(loaded, straight)
    assert results["steps"] == 4 and all(math.isfinite(v) for _, v in results["losses"])
    controlnet = SD3ControlNetModel.from_pretrained(straight.controlnet)
    assert controlnet.config.num_layers == 2  # every block of the tiny transformer's 3 but the last
    assert (straight.samples / "step-4.png").is_file()
    assert "- sd3" in straight.model_card.read_text()

    loaded, short = make_run(*SD3, "train.max_steps=2", "train.checkpoint_every=10", name="short")
    train_controlnet(loaded, short)
    loaded, _ = make_run(*SD3, "train.max_steps=4", "train.checkpoint_every=10", name="short")
    assert train_controlnet(loaded, short, resume=True)["resumed_from"] == 2
    a = SD3ControlNetModel.from_pretrained(short.controlnet).state_dict()
    b = controlnet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_and_reference_mode_give_the_same_losses(make_run):
    losses = {}
    for precompute in (True, False):
        loaded, folder = make_run(
            *SD3, "train.max_steps=3", f"train.precompute={str(precompute).lower()}", name=f"p-{precompute}"
        )
        losses[precompute] = [v for _, v in train_controlnet(loaded, folder)["losses"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_flow_options_change_the_loss(make_run):
    finals = set()
    for scheme in ("logit_normal", "mode", "sigma_sqrt"):
        loaded, folder = make_run(
            *SD3, "train.max_steps=1", f"train.flow_matching.weighting_scheme={scheme}", name=scheme
        )
        finals.add(round(train_controlnet(loaded, folder)["final_loss"], 6))
    assert len(finals) == 3


def test_family_is_guessed_from_sd3_names():
    for base in (
        "stabilityai/stable-diffusion-3.5-medium",
        "stabilityai/stable-diffusion-3-medium-diffusers",
    ):
        assert guess_family(base) == "sd3"
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.snr_gamma=5", "train.snr_gamma"),
        ("model.conditioning_channels=1", "model.conditioning_channels"),
        ("train.attention=eager", "train.attention"),
    ],
)
def test_options_sd3_does_not_take_are_refused_at_validation(tmp_path, override, field):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndataset: {source: {builtin: shapes}}\nmodel: {base: 'builtin:tiny-sd3'}\n"
        "train:\n  max_steps: 2\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert any(p.path == field and "SD3" in p.message for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "override",
    ["train.flow_matching={weighting_scheme: mode}", "model.controlnet_layers=4", "model.t5=false"],
)
def test_sd3_options_are_refused_for_other_families(tmp_path, override):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndataset: {source: {builtin: shapes}}\nmodel: {base: 'builtin:tiny-sd'}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert "applies only to SD3" in str(info.value.problems[0].message)


def test_a_folder_of_another_family_is_named(make_run):
    from recipe_runner.errors import UserError

    loaded, folder = make_run(name="sd15")
    sd15 = resolve_base(loaded, folder.models_cache)
    loaded, _ = make_run(f"model.base={sd15}", "model.family=sd3", name="as-sd3")
    assert family_of(loaded.recipe).name == "sd3"
    with pytest.raises(UserError, match="unet/"):
        load_components(loaded, sd15)


@pytest.fixture
def sd3_with_t5(make_run, tmp_path):
    """The tiny SD3 folder plus a tiny random T5 encoder (its tokenizer: the tiny CLIP one, offline)."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

    loaded, folder = make_run(*SD3, name="plain")
    base = tmp_path / "tiny-sd3-t5"
    shutil.copytree(resolve_base(loaded, folder.models_cache), base)
    write_tiny_clip_tokenizer(base / "tokenizer_3")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=64, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    t5.save_pretrained(base / "text_encoder_3")
    return base


def test_t5_tokens_follow_the_clip_tokens_and_model_t5_false_leaves_them_out(make_run, sd3_with_t5):
    prompts = ["a red circle", "a blue square"]
    loaded, _ = make_run(f"model.base={sd3_with_t5}", "model.family=sd3", name="t5")
    c = load_components(loaded, str(sd3_with_t5), unet=False)
    assert len(c.text_encoders) == 3
    embeds, pooled = c.family.encode_prompts(c, prompts)
    assert embeds.shape == (2, 77 + 77, 64) and pooled.shape == (2, 64)
    assert embeds[:, 77:].abs().sum() > 0  # T5's tokens, after the (padded) CLIP ones

    loaded, _ = make_run(f"model.base={sd3_with_t5}", "model.family=sd3", "model.t5=false", name="no-t5")
    c = load_components(loaded, str(sd3_with_t5), unet=False)
    assert len(c.text_encoders) == 2
    without, same_pooled = c.family.encode_prompts(c, prompts)
    assert torch.all(without[:, 77:] == 0) and torch.equal(same_pooled, pooled)
    assert torch.equal(without[:, :77], embeds[:, :77])


def test_a_run_with_t5_trains_and_samples(make_run, sd3_with_t5):
    loaded, folder = make_run(
        f"model.base={sd3_with_t5}", "model.family=sd3", "train.max_steps=2", name="t5run"
    )
    results = train_controlnet(loaded, folder)
    assert math.isfinite(results["final_loss"]) and (folder.samples / "step-2.png").is_file()


def test_plan_offers_fp8_and_lora_but_no_memory_saver_sd3_refuses(tmp_path):
    from recipe_runner.run.estimates import memory_savers

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndataset: {source: {builtin: shapes}, resolution: 1024}\n"
        "model: {base: stabilityai/stable-diffusion-3.5-medium}\ntrain: {max_steps: 2}\n"
    )
    savers, lighter = memory_savers(load_recipe(path).recipe)
    assert any("gradient_checkpointing" in s for s in savers)
    assert any("fp8_base" in s for s in savers) and any("train.lora" in s for s in savers), savers
    assert not any("snr_gamma" in s or "attention" in s for s in savers), savers
    assert lighter.train.lora is not None and lighter.train.fp8_base


def test_the_precompute_cache_holds_the_control_latents(make_run):
    """Encoded once with the other latents (the step then needs no VAE), and equal to what a step in
    reference mode encodes."""
    import numpy as np

    from recipe_runner.training.data import load_rows, to_conditioning
    from recipe_runner.training.precompute import EncodedCache
    from recipe_runner.training.session import cache_folder

    loaded, folder = make_run(*SD3, "train.max_steps=1", name="cache")
    train_controlnet(loaded, folder)
    base = resolve_base(loaded, folder.models_cache)
    cache = EncodedCache.open(cache_folder(loaded, folder, base, torch.float32))
    assert cache is not None and cache.control_latents is not None
    c = load_components(loaded, base, unet=False)
    rows = load_rows(folder.dataset_data, loaded.recipe)["train"]
    cond = to_conditioning(rows[3]["conditioning_image"], 64, 3)[None]
    expected = c.family.control_latents(c, cond, torch.float32)[0].numpy()
    assert np.allclose(cache.controls(np.array([3]))[0], expected, atol=1e-5)  # batched: rounding


@pytest.mark.parametrize("base", ["builtin:tiny-sd3", "builtin:shapes-sd3"])
def test_prompts_are_encoded_as_the_sd3_pipeline_encodes_them(make_run, base):
    """Training's text is what the pipeline gives the transformer when we sample: CLIP tokens as long as
    the tokenizer (77 for tiny-sd3, 16 for shapes-sd3), then max_sequence_length (77, which sampling
    passes) zero tokens where T5's would be, not as many as the CLIP ones."""
    from diffusers import StableDiffusion3Pipeline

    loaded, folder = make_run(f"model.base={base}", name=base.removeprefix("builtin:"))
    path = resolve_base(loaded, folder.models_cache)
    c = load_components(loaded, path, unet=False)
    prompts = ["a red circle on a white background", "a navy blue star on an orange background"]
    with torch.no_grad():
        ours, pooled = c.family.encode_prompts(c, prompts)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
        theirs, _, their_pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert torch.equal(pooled, their_pooled)
    assert c.family.text_shape(c)[0] == theirs.shape[1]
