"""train.lora: a LoRA of the ControlNet, merged into an ordinary ControlNet when saved."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file

from recipe_runner.errors import UserError
from recipe_runner.recipe.train import LoraSpec
from recipe_runner.training import train_controlnet
from recipe_runner.training.lora import add_lora, plain_copy, trainable

LORA = ("train.lora={rank: 4}", "train.checkpoint_every=10")


def _controlnet() -> ControlNetModel:
    from recipe_runner.models.tiny import _unet

    torch.manual_seed(0)
    return ControlNetModel.from_unet(_unet(0, cross_attention_dim=32, attention_head_dim=8))


def _inputs(c: ControlNetModel) -> dict:
    g = torch.Generator().manual_seed(1)
    cross = c.config.cross_attention_dim
    return {
        "sample": torch.randn(2, c.config.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, cross, generator=g),
        "controlnet_cond": torch.rand(2, 3, 64, 64, generator=g),
        "return_dict": False,
    }


def _outputs(model: ControlNetModel, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = model(**inputs)
    return [*down, mid]


def test_only_the_lora_and_the_controlnets_additions_train_and_it_starts_unchanged():
    plain = _controlnet()
    inputs = _inputs(plain)
    for p in plain.controlnet_down_blocks.parameters():  # zero convs at zero would hide any difference
        torch.nn.init.normal_(p, std=0.1)
    before = _outputs(plain, inputs)
    lora = add_lora(plain, LoraSpec(rank=4), torch.float32)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(
        "lora_" in n
        or n.startswith(("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block"))
        for n in names
    )
    assert any("lora_" in n for n in names) and sum(p.numel() for p in trainable(lora)) < sum(
        p.numel() for p in lora.parameters()
    )
    # LoRA's B matrices start at zero: the adapted ControlNet computes what the plain one did.
    for a, b in zip(before, _outputs(lora, inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_frozen_weights_take_the_compute_precision_trained_ones_stay_fp32():
    lora = add_lora(_controlnet(), LoraSpec(rank=2), torch.bfloat16)
    dtypes = {p.requires_grad: set() for p in lora.parameters()}
    for p in lora.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


def test_merging_gives_a_plain_controlnet_with_the_same_outputs():
    lora = add_lora(_controlnet(), LoraSpec(rank=4, alpha=8), torch.float32)
    inputs = _inputs(lora)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or name.startswith("controlnet_down_blocks"):
                p.normal_(std=0.05)  # as if trained
    plain = plain_copy(lora)
    assert not any("lora" in k for k in plain.state_dict())
    assert any("lora" in k for k in lora.state_dict())  # the original keeps its adapter
    for a, b in zip(_outputs(lora, inputs), _outputs(plain, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_lora_run_saves_a_loadable_controlnet_and_resumes_bit_identically(straight_and_resumed):
    straight, _ = straight_and_resumed(*LORA)
    saved = ControlNetModel.from_pretrained(straight.controlnet)  # an ordinary diffusers ControlNet
    assert not any("lora" in k for k in saved.state_dict())
    raw = load_file(straight.checkpoints / "step-4" / "model.safetensors")
    assert any("lora_A" in k for k in raw)  # the checkpoint keeps the adapter, for resuming
    assert "LoRA of the ControlNet (rank 4)" in straight.model_card.read_text()


def test_bf16_lora_validates_on_the_cpu(make_run):
    """The CPU validation copy of a bf16 run is the merged ControlNet rebuilt from its config (a deep copy
    kept accelerate's fp32-output wrapper, and the bf16 UNet refused its residuals)."""
    loaded, folder = make_run(
        *LORA, "train.mixed_precision=bf16", "train.max_steps=2", "train.validation.every=1"
    )
    assert math.isfinite(train_controlnet(loaded, folder)["final_loss"])
    assert (folder.samples / "step-1.png").is_file() and (folder.samples / "step-2.png").is_file()


def test_lora_is_lighter_in_the_estimate_and_traces(cli, plan_recipe, tmp_path):
    import json

    recipe = plan_recipe
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.estimates import estimate_memory

    full = estimate_memory(load_recipe(recipe).recipe)
    lora = estimate_memory(load_recipe(recipe, ["train.lora={rank: 4}"]).recipe)
    assert (
        lora.gradients_gb < full.gradients_gb / 2
        and lora.controlnet_training_gb < full.controlnet_training_gb
    )
    result = cli("plan", recipe, "-o", tmp_path / "run", "--trace", "--json", "--set", "train.lora={rank: 4}")
    traced = json.loads(result.output)["memory"]["traced"]
    assert traced["optimizer_state_gb"] > 0  # the LoRA and the additions have AdamW state


def test_without_peft_the_recipe_says_what_to_install(make_run, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    loaded, folder = make_run(*LORA, "train.max_steps=1", name="nopeft")
    with pytest.raises(UserError, match=r"train\.lora needs PEFT") as info:
        train_controlnet(loaded, folder)
    assert "pip install 'recipe-runner[lora]'" in info.value.hint


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd35m", "flux-dev"])
def test_the_estimates_lora_sizes_are_the_counted_ones(arch, tmp_path):
    """run/estimates.py's per-rank and in-full counts, against training/lora.py's targets on the full
    architecture (meta device: no memory): they must move together."""
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.estimates import LORA_FULL_PARAMS, LORA_PARAMS_PER_RANK
    from recipe_runner.training.memory_trace import arch_components

    path = tmp_path / "r.yaml"
    family, base = {
        "sd15": ("sd1", "tiny-sd"),
        "sdxl": ("sdxl", "tiny-sd"),
        "sd35m": ("sd3", "tiny-sd3"),
        "flux-dev": ("flux", "tiny-flux"),
    }[arch]
    path.write_text(
        f"name: t\ndataset: {{source: {{builtin: shapes}}}}\nmodel: {{base: 'builtin:{base}', family: {family}}}\n"
    )
    c = arch_components(load_recipe(path), arch, tmp_path / "models")
    lora = add_lora(c.controlnet, LoraSpec(rank=8), torch.float16)
    matrices = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    in_full = sum(p.numel() for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n)
    assert (matrices, in_full) == (8 * LORA_PARAMS_PER_RANK[family], LORA_FULL_PARAMS[family])


@pytest.mark.parametrize("base", ["tiny-sd3", "tiny-flux"])
def test_a_flow_matching_lora_run_saves_its_familys_controlnet_and_an_adapter_that_reloads(
    straight_and_resumed, make_run, base
):
    """SD3 and FLUX.1 ControlNets take train.lora as SD's do: resumed bit-identically, `controlnet/` an
    ordinary SD3ControlNetModel / FluxControlNetModel, and `adapter/` plus a fresh ControlNet made from the
    base transformer give those weights back."""
    from recipe_runner.export.adapter import load_onto
    from recipe_runner.families.loading import load_components, resolve_base

    straight, _ = straight_and_resumed(*LORA, f"model.base=builtin:{base}")
    loaded, folder = make_run(*LORA, f"model.base=builtin:{base}", "train.max_steps=4", name="straight")
    c = load_components(loaded, resolve_base(loaded, folder.models_cache))
    saved = c.family.controlnet_class().from_pretrained(straight.controlnet)
    assert not any("lora" in k for k in saved.state_dict())
    raw = load_file(straight.checkpoints / "step-4" / "model.safetensors")
    lora_keys = [k for k in raw if "lora_A" in k]
    assert lora_keys and all(any(t in k for t in c.family.lora_targets) for k in lora_keys)
    fresh = plain_copy(load_onto(c.controlnet, straight.adapter)).state_dict()
    merged = saved.state_dict()
    assert fresh.keys() == merged.keys()
    worst = max((fresh[k] - merged[k]).abs().max().item() for k in merged)
    assert worst < 1e-5
    # Only the LoRA and the ControlNet's own additions moved: the copied blocks' other weights did not.
    base_state = c.family.new_controlnet(loaded, c).state_dict()
    moved = {k for k in merged if not torch.equal(merged[k], base_state[k])}
    targets = tuple(f"{t}.weight" for t in c.family.lora_targets) + tuple(
        f"{t}.bias" for t in c.family.lora_targets
    )
    in_full = {k for k in moved if k.startswith(c.family.lora_trained_in_full)}
    assert in_full and moved - in_full and all(k.endswith(targets) for k in moved - in_full)
