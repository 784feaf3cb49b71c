"""`train.fp8_base`: the frozen UNet stored in fp8, cast up layer by layer while it runs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from recipe_runner.training import train_controlnet
from recipe_runner.training.fp8 import STORAGE_DTYPE, store_in_fp8


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).requires_grad_(False)


def _step(unet: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of a UNet pass, as a ControlNet's residuals would get them."""
    torch.manual_seed(1)
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 7, 32)
    # What a ControlNet adds: one residual per skip connection, and one at the mid block.
    shapes = [(32, 8), (32, 8), (32, 4), (64, 4), (64, 4)]
    residuals = [torch.zeros(2, c, s, s, requires_grad=True) for c, s in shapes]
    out = unet(
        sample,
        10,
        text,
        down_block_additional_residuals=residuals[:-1],
        mid_block_additional_residual=residuals[-1],
    ).sample
    out.square().mean().backward()
    return out.detach(), torch.cat([r.grad.flatten() for r in residuals])


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_fp8_storage_computes_what_an_fp8_rounded_unet_computes(checkpointing):
    """Bit for bit, forward and backward, with gradient checkpointing too: diffusers' own layerwise casting
    changes the weights in place and fails checkpointing's recomputation check there."""
    stored, rounded = _tiny_unet(), _tiny_unet()
    n = store_in_fp8(stored, torch.float32)
    with torch.no_grad():  # the same layers, rounded through fp8 but kept in fp32
        for p, q in zip(stored.parameters(), rounded.parameters(), strict=True):
            if p.dtype == STORAGE_DTYPE:
                q.copy_(q.to(STORAGE_DTYPE).float())
    assert n > 0.9 * sum(p.numel() for p in rounded.parameters())  # all but norms and a few biases
    assert stored.conv_in.weight.dtype == STORAGE_DTYPE
    assert stored.mid_block.resnets[0].norm1.weight.dtype == torch.float32  # norms keep their precision
    assert stored.dtype == torch.float32  # what pipelines cast their inputs to
    if checkpointing:
        stored.enable_gradient_checkpointing()
        rounded.enable_gradient_checkpointing()
    stored.train(checkpointing)  # diffusers checkpoints only when training
    rounded.train(checkpointing)
    expected_out, expected_grad = _step(rounded)
    for _ in range(2):  # the second pass starts where a checkpointed recomputation stopped early
        out, grad = _step(stored)
        assert torch.equal(out, expected_out)
        assert torch.equal(grad, expected_grad)
    # Back to fp8 storage after the pass (a checkpointed layer may stay cast up until it next runs).
    stored_bytes = sum(p.numel() * p.element_size() for p in stored.parameters())
    assert stored_bytes < 0.35 * sum(p.numel() * 4 for p in rounded.parameters())


def test_training_with_fp8_base_trains_and_changes_the_result(make_run):
    loaded, plain = make_run(
        "train.max_steps=2", "train.gradient_checkpointing=true", "train.mixed_precision=bf16", name="plain"
    )
    reference = train_controlnet(loaded, plain)
    loaded, folder = make_run(
        "train.max_steps=2",
        "train.gradient_checkpointing=true",
        "train.mixed_precision=bf16",
        "train.fp8_base=true",
        name="fp8",
    )
    result = train_controlnet(loaded, folder)
    assert (folder.controlnet / "diffusion_pytorch_model.safetensors").is_file()
    assert result["final_loss"] != reference["final_loss"]  # the option took effect
    assert result["final_loss"] == pytest.approx(reference["final_loss"], rel=0.2)


@pytest.mark.parametrize("base", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_fp8_base_trains_the_transformer_families(make_run, base):
    """The transformer's weight-heavy layers are stored in fp8 (norms and embeddings of positions are not),
    and training with it gives a loss near the unquantised one. (In bf16 on the CPU, validation samples
    with a bf16 copy of the ControlNet, which was made as an SD one whatever the family: the bug this
    test found.)"""
    from recipe_runner.families.loading import load_components, resolve_base
    from recipe_runner.training.session import place_models

    common = ("train.max_steps=2", "train.gradient_checkpointing=true", "train.mixed_precision=bf16")
    loaded, folder = make_run(f"model.base={base}", *common, "train.fp8_base=true", name="fp8")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache))
    place_models(loaded.recipe, c, "cpu", torch.bfloat16)
    dtypes = {n: p.dtype for n, p in c.denoiser.named_parameters()}
    assert sum(d == STORAGE_DTYPE for d in dtypes.values()) > len(dtypes) / 2, dtypes
    assert all(d != STORAGE_DTYPE for n, d in dtypes.items() if "norm" in n)
    result = train_controlnet(loaded, folder)
    plain_loaded, plain = make_run(f"model.base={base}", *common, name="plain")
    reference = train_controlnet(plain_loaded, plain)
    assert result["final_loss"] != reference["final_loss"]  # the option took effect
    assert result["final_loss"] == pytest.approx(reference["final_loss"], rel=0.2)


@pytest.mark.parametrize("arch", ["sd15", "sd35m", "flux-dev"])
def test_the_estimates_fp8_share_is_the_counted_one(arch, tmp_path):
    """`recipe plan` sizes an fp8 base by its family's fp8_share: what store_in_fp8 stores in fp8 on the
    full-size architecture (meta device), against the family's size. FLUX.1-dev keeps 3.25B modulation
    weights in bf16; counted as fp8, plan said 17 GB for a run that traced 23.6."""
    from recipe_runner.families import FAMILIES
    from recipe_runner.models.archs import ARCHS, random_models

    with torch.device("meta"):
        _, _, denoiser, _ = random_models(arch, tmp_path)
    figures = FAMILIES[ARCHS[arch].family].figures
    stored = store_in_fp8(denoiser, torch.bfloat16)
    assert stored / figures.size.unet == pytest.approx(figures.fp8_share, abs=0.002)
