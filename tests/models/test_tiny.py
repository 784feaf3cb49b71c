"""Builtin tiny SD/SDXL models: load with diffusers offline, run with a ControlNet, cache once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)

from recipe_runner.data.builtin_shapes import make_sample
from recipe_runner.errors import UserError
from recipe_runner.models import tiny
from recipe_runner.models.tiny import BUILTIN_MODELS, build_tiny_sd, resolve_builtin


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _controlnet_forward(unet: UNet2DConditionModel, **added) -> torch.Tensor:
    """UNet + ControlNet.from_unet at 64px (8x8 latents), as a training step would call them."""
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    cond = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        down, mid = controlnet(
            latents, timesteps, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False, **added
        )
        out = unet(
            latents,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **added,
        ).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    return out


def test_tiny_sd_loads_and_runs_with_a_controlnet(tiny_sd: Path):
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert list((tiny_sd / "unet").glob("*.safetensors"))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert pipe.vae_scale_factor == 8  # matches ControlNet's 8x conditioning embedding
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert _params(pipe.unet) < 3_000_000 and _params(pipe.vae) < 3_000_000
    _controlnet_forward(pipe.unet)


def test_tiny_sd_controlnet_pipeline_generates_64px(tiny_sd: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=ControlNetModel.from_unet(unet), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    row = make_sample(0, seed=0, resolution=64)
    out = pipe(row["prompt"], image=row["conditioning_image"], num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_tiny_sdxl_loads_and_runs_with_a_controlnet(tiny_sdxl: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl, controlnet=ControlNetModel.from_unet(unet), add_watermarker=False
    )
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    assert config.projection_class_embeddings_input_dim == pooled_dim + 6 * config.addition_time_embed_dim
    added = {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, pooled_dim),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        }
    }
    _controlnet_forward(pipe.unet, **added)

    pipe.set_progress_bar_config(disable=True)
    row = make_sample(1, seed=0, resolution=64)
    out = pipe(row["prompt"], image=row["conditioning_image"], num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_builds_are_deterministic(tmp_path: Path):
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = (build_tiny_sd(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()


def test_resolve_builtin_builds_once_then_reuses(tmp_path: Path):
    folder = resolve_builtin("tiny-sd", tmp_path)
    assert folder == tmp_path / "tiny-sd" and (folder / "model_index.json").is_file()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_builtin("tiny-sd", tmp_path) == folder
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # no temporary folders left behind


def test_resolve_builtin_rebuilds_stale_folders(tmp_path: Path):
    folder = resolve_builtin("tiny-sd", tmp_path)
    marker = folder / tiny.MARKER_FILE
    marker.write_text(json.dumps({"name": "tiny-sd", "version": tiny.BUILD_VERSION - 1}))
    resolve_builtin("tiny-sd", tmp_path)
    assert json.loads(marker.read_text())["version"] == tiny.BUILD_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]


def test_interrupted_build_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def half_build(out_dir: Path, *, seed: int = 0) -> Path:
        (out_dir / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(BUILTIN_MODELS, "tiny-sd", half_build)
    with pytest.raises(KeyboardInterrupt):
        resolve_builtin("tiny-sd", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_builtin_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError) as info:
        resolve_builtin("tiny-sd9", tmp_path)
    assert "tiny-sd9" in info.value.message
    assert "tiny-sd" in info.value.hint and "tiny-sdxl" in info.value.hint
    assert not (tmp_path / "tiny-sd9").exists()
