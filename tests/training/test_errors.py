"""What users get wrong, and runs that fail: clear errors before (or instead of) a traceback."""

from __future__ import annotations

import shutil

import pytest
import torch

from recipe_runner.errors import RunFailed, UserError
from recipe_runner.families.loading import resolve_base
from recipe_runner.training import prepare_training, step, train_controlnet


def test_missing_base_folder_is_a_user_error(make_run, tmp_path):
    loaded, folder = make_run(f"model.base={tmp_path / 'nowhere' / 'sd15'}")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "model.base" in info.value.message and "nowhere" in info.value.message
    assert not folder.controlnet.exists() and not folder.checkpoints.exists()


def test_sdxl_recipe_on_an_sd15_folder_is_a_user_error(make_run):
    loaded, folder = make_run()
    sd15 = resolve_base(loaded, folder.models_cache)
    loaded, folder = make_run(f"model.base={sd15}", "model.family=sdxl", name="xl")
    with pytest.raises(UserError) as info:
        prepare_training(loaded, folder)
    assert "text_encoder_2" in info.value.message and "SDXL" in info.value.message
    assert "model.family" in info.value.hint


def test_sd15_recipe_on_an_sdxl_folder_is_a_user_error(make_run):
    loaded, folder = make_run("model.base=builtin:tiny-sdxl")
    sdxl = resolve_base(loaded, folder.models_cache)
    loaded, folder = make_run(f"model.base={sdxl}", "model.family=sd1", name="sd1")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "looks like an SDXL model" in info.value.message


def test_a_folder_without_a_unet_is_a_user_error(make_run, tmp_path):
    loaded, folder = make_run()
    broken = tmp_path / "broken"
    shutil.copytree(resolve_base(loaded, folder.models_cache), broken)
    shutil.rmtree(broken / "unet")
    loaded, folder = make_run(f"model.base={broken}", name="broken")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "lacks unet/" in info.value.message


def test_adamw_8bit_without_bitsandbytes_names_the_extra(make_run, monkeypatch):
    from recipe_runner.training import features

    installed = features._installed
    monkeypatch.setattr(features, "_installed", lambda m: m != "bitsandbytes" and installed(m))
    loaded, folder = make_run("train.optimizer=adamw_8bit")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "bitsandbytes" in info.value.message and "recipe-runner[bnb]" in info.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works where there is a GPU")
def test_fp16_without_a_gpu_is_a_user_error(make_run):
    loaded, folder = make_run("train.mixed_precision=fp16")
    with pytest.raises(UserError) as info:
        prepare_training(loaded, folder)
    assert "bf16" in info.value.hint


def test_missing_dataset_is_a_user_error(make_run):
    loaded, folder = make_run()
    shutil.rmtree(folder.dataset_data)
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder)
    assert "build-dataset" in info.value.hint


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    count = {"n": 0}
    loss = step.diffusion_loss

    def sometimes_nan(prediction, target):
        count["n"] += 1
        value = loss(prediction, target)
        return value * float("nan") if count["n"] == call else value

    monkeypatch.setattr(step, "diffusion_loss", sometimes_nan)


def test_nonfinite_loss_stops_naming_the_step_and_the_last_checkpoint(make_run, monkeypatch):
    _nan_on_call(monkeypatch, 3)
    loaded, folder = make_run("train.max_steps=4", "train.checkpoint_every=2")
    with pytest.raises(RunFailed) as info:
        train_controlnet(loaded, folder)
    message = info.value.message
    assert "optimizer step 3" in message and "nan" in message and "step-2" in message
    assert not folder.controlnet.exists()


def test_nonfinite_loss_skip_skips_that_update(make_run, monkeypatch):
    _nan_on_call(monkeypatch, 2)
    loaded, folder = make_run("train.max_steps=3", "train.nonfinite_loss=skip")
    results = train_controlnet(loaded, folder)
    assert results["skipped_steps"] == 1 and results["steps"] == 3
    from safetensors.torch import load_file

    weights = load_file(folder.controlnet / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes runs on the GPU there")
def test_adamw_8bit_with_a_cuda_only_bitsandbytes_on_a_cpu_is_a_user_error(make_run, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from recipe_runner.training import features

    monkeypatch.setattr(features, "_bnb_runs_on_cpu", lambda: False)
    loaded, folder = make_run("train.optimizer=adamw_8bit")
    with pytest.raises(UserError) as info:
        prepare_training(loaded, folder)
    assert "no CPU kernel" in info.value.message and "train.optimizer: adamw" in info.value.hint


def test_every_step_skipped_is_a_failed_run(make_run, monkeypatch):
    monkeypatch.setattr(
        step, "diffusion_loss", lambda prediction, target: (prediction - target).sum() * float("nan")
    )
    loaded, folder = make_run("train.max_steps=2", "train.nonfinite_loss=skip")
    with pytest.raises(RunFailed) as info:
        train_controlnet(loaded, folder)
    assert "every one of the 2 optimizer steps" in info.value.message
    assert not folder.controlnet.exists()
