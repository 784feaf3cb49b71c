"""Model options (VAE override, ControlNet to fine-tune) and speed switches."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.errors import UserError
from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.training import features, train_controlnet
from recipe_runner.training.keys import resume_fields


def test_vae_override_replaces_the_base_vae(make_run, tmp_path):
    loaded, folder = make_run()
    base = resolve_base(loaded, folder.models_cache)
    vae = tmp_path / "my-vae"
    shutil.copytree(f"{base}/vae", vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    loaded, _ = make_run("model.vae=my-vae", name="vae")  # relative to the recipe's folder
    components = load_components(loaded, base, unet=False)
    assert components.vae.config.scaling_factor == 0.5


def test_an_existing_controlnet_is_fine_tuned(make_run):
    loaded, first = make_run("train.max_steps=1", name="first")
    train_controlnet(loaded, first)
    loaded, second = make_run("train.max_steps=1", f"model.controlnet={first.controlnet}", name="second")
    train_controlnet(loaded, second)
    before = load_file(first.controlnet / "diffusion_pytorch_model.safetensors")
    after = load_file(second.controlnet / "diffusion_pytorch_model.safetensors")
    # One more step moved the weights a little from where the first run left them, not from scratch.
    moved = [(after[k] - before[k]).abs().max().item() for k in before]
    assert max(moved) > 0 and max(moved) < 1e-3

    loaded, third = make_run(
        f"model.controlnet={first.controlnet}", "model.conditioning_channels=1", name="c1"
    )
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, third)
    assert "model.conditioning_channels: 3" in info.value.hint


def test_a_controlnet_made_for_another_base_is_refused_before_training(make_run, tmp_path):
    """A ControlNet whose conditioning embedding shrinks images 4x (the shapes-sd base's VAE) cannot
    steer tiny-sd (8x): a message naming what differs, not a shape error at the first step."""
    from diffusers import ControlNetModel

    loaded, folder = make_run()
    unet = load_components(loaded, resolve_base(loaded, folder.models_cache), controlnet=False).unet
    other = tmp_path / "other-controlnet"
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96)).save_pretrained(other)
    loaded, folder = make_run(f"model.controlnet={other}", name="other")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "was made for another base" in info.value.message
    assert "it shrinks conditioning images 4x, the base's VAE 8x" in info.value.message
    assert "model.controlnet: null" in info.value.hint


def test_xformers_without_the_package_names_the_extra(make_run):
    loaded, folder = make_run("train.attention=xformers")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "recipe-runner[xformers]" in info.value.hint


def test_speed_switches_keep_training_working(make_run):
    loaded, plain = make_run("train.max_steps=2", "train.precompute=false", name="plain")
    reference = train_controlnet(loaded, plain)
    loaded, folder = make_run(
        "train.max_steps=2",
        "train.precompute=false",
        "train.gradient_checkpointing=true",
        "train.channels_last=true",
        "train.attention=eager",
        "train.dataloader_num_workers=1",
        "train.allow_tf32=true",
        "train.set_grads_to_none=false",
        name="switches",
    )
    results = train_controlnet(loaded, folder)
    assert math.isfinite(results["final_loss"])
    # Same data, noise and weights: only the arithmetic's order differs.
    assert results["losses"][0][1] == pytest.approx(reference["losses"][0][1], rel=1e-4)


@pytest.mark.slow
def test_compiled_training_matches_eager(make_run):
    """torch.compile (inductor; minutes of compiling on a CPU) changes speed, not results."""
    loaded, eager = make_run("train.max_steps=2", name="eager")
    reference = train_controlnet(loaded, eager)
    loaded, compiled = make_run("train.max_steps=2", "train.compile=true", name="compiled")
    results = train_controlnet(loaded, compiled)
    for (_, a), (_, b) in zip(reference["losses"], results["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert (compiled.controlnet / "config.json").is_file()


def _optimizer_after_one_step(recipe, seed: int = 0) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(8, 4), (4,), (3, 3, 2, 2)]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = features.make_optimizer(recipe, params, lr=1e-2)
    optimizer.step()
    return optimizer, [p.detach().clone() for p in params]


def test_fused_adamw_by_default_with_the_reference_update(make_run):
    fused, after_fused = _optimizer_after_one_step(make_run()[0].recipe)
    plain, after_plain = _optimizer_after_one_step(make_run("train.fused_optimizer=false")[0].recipe)
    assert fused.defaults["fused"] is True
    assert not plain.defaults["fused"]  # torch's default: what diffusers' script gets
    for a, b in zip(after_fused, after_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_adamw_falls_back_where_the_device_has_no_kernel(make_run, monkeypatch, caplog):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported devices"
            )
        return real(params, **kwargs)

    monkeypatch.setattr(features.torch.optim, "AdamW", no_fused)
    optimizer, _ = _optimizer_after_one_step(make_run()[0].recipe)
    assert not optimizer.defaults["fused"]
    assert "fused AdamW unavailable" in caplog.text


def test_switching_the_optimizer_kernel_refuses_resume(make_run):
    assert resume_fields(make_run()[0].recipe) != resume_fields(
        make_run("train.fused_optimizer=false")[0].recipe
    )


def test_loader_workers_give_the_same_batches_across_epochs(make_run):
    """One DataLoader reads ahead over epoch ends (4 batches an epoch here); the order must not change."""
    losses = {}
    for workers in (0, 2):
        loaded, folder = make_run(
            "train.max_steps=6", f"train.dataloader_num_workers={workers}", name=f"workers-{workers}"
        )
        losses[workers] = [loss for _, loss in train_controlnet(loaded, folder)["losses"]]
    assert len(losses[0]) == 6 and losses[0] == losses[2]


def test_loader_workers_default_to_none_on_a_cpu_and_some_per_gpu(monkeypatch):
    from recipe_runner.training.data import loader_workers

    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(None, torch.device("cuda", 0)) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert loader_workers(None, torch.device("cuda", 0)) == 1


def test_evaluate_at_validation_scores_each_validation_step(make_run):
    loaded, folder = make_run(
        "train.max_steps=4",
        "train.validation.every=2",
        "dataset.holdout=2",
        "evaluate.enabled=true",
        "evaluate.at_validation=true",
        "evaluate.num_inference_steps=1",
        name="eval-curve",
    )
    results = train_controlnet(loaded, folder)
    steps = [step for step, _ in results["evaluations"]]
    assert steps == [2, 4]  # every validation, and the final one
    assert all(0.0 <= scores["edge_f1"] <= 1.0 for _, scores in results["evaluations"])
    state = json.loads((folder.checkpoints / "step-4" / "state.json").read_text())
    assert [step for step, _ in state["evaluations"]] == [2]  # the step-4 checkpoint is written before it


def test_without_at_validation_training_does_not_evaluate(make_run):
    loaded, folder = make_run(
        "train.max_steps=2", "dataset.holdout=2", "evaluate.enabled=true", name="no-curve"
    )
    assert train_controlnet(loaded, folder)["evaluations"] == []


def test_mixed_precision_runs_the_controlnet_under_autocast_without_its_weight_cache(make_run, monkeypatch):
    """The cache would hold a half copy of every ControlNet weight until the forward pass ends, which
    gradient checkpointing otherwise frees block by block (benchmarks/memory.py)."""
    from diffusers import ControlNetModel

    seen = []
    forward = ControlNetModel.forward

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        seen.append(torch.is_autocast_cache_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", spy)
    loaded, folder = make_run("train.max_steps=1", "train.mixed_precision=bf16")
    train_controlnet(loaded, folder)
    assert seen[:2] == [(True, torch.bfloat16), False]  # the first call is the training step's


def test_importing_the_training_stage_prints_no_bitsandbytes_warning():
    """accelerate/diffusers import bitsandbytes when installed; its CPU backend's import-time warning
    (a 4-bit kernel package 8-bit AdamW never uses) landed in every run's output and log."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = "import recipe_runner.training.stage, bitsandbytes"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels" not in out.stderr + out.stdout
