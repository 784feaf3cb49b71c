"""The shipped pretrained shapes-sd base: small, loads offline, runs with a ControlNet, copies to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextModel

from recipe_runner.data.builtin_shapes import make_sample
from recipe_runner.models.shapes_base import (
    materialize_shapes_base,
    shapes_base_path,
    shapes_base_settings,
)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(shapes_base_path(), safety_checker=None)


def test_shipped_folder_is_small_and_complete():
    folder = shapes_base_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 12 * 2**20
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir()
    assert "_name_or_path" not in json.loads((folder / "model_index.json").read_text())
    settings = shapes_base_settings()
    assert settings["resolution"] == 64 and settings["vae_downsample"] == 4
    # ControlNet's conditioning embedding must downsample exactly like the VAE.
    assert 2 ** (len(settings["controlnet_conditioning_embedding_out_channels"]) - 1) == 4


def test_loads_offline_in_fp32_and_generates(pipe: StableDiffusionPipeline):
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    # SD pipelines ignore shift_factor: the latent centring lives inside the VAE's weights.
    assert pipe.vae.config.scaling_factor == 1.0 and pipe.vae.config.shift_factor is None
    _assert_draws_64px(pipe)


def test_controlnet_from_unet_runs_at_64px(pipe: StableDiffusionPipeline):
    channels = shapes_base_settings()["controlnet_conditioning_embedding_out_channels"]
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
    cn_pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"},
        controlnet=controlnet,
        requires_safety_checker=False,
    )
    _assert_draws_64px(cn_pipe, image=make_sample(0, seed=0, resolution=64)["conditioning_image"])


def _assert_draws_64px(pipe, **control) -> None:
    """`pipe` draws one 64 px image in 2 steps; `control`: a ControlNet pipeline's conditioning image
    (SD's pipelines call it `image`, SD3's `control_image`)."""
    images = pipe(
        "a red circle on a white background",
        **control,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (64, 64)


def test_materialize_writes_an_fp32_copy_once(tmp_path: Path):
    folder = materialize_shapes_base(tmp_path)
    assert folder == tmp_path / "shapes-sd"
    # transformers 5 loads a text encoder in its saved dtype: the copy must say fp32.
    assert CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").dtype == torch.float32
    unet_weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert (
        unet_weights.stat().st_size > (shapes_base_path() / unet_weights.relative_to(folder)).stat().st_size
    )
    mtime = unet_weights.stat().st_mtime_ns
    assert materialize_shapes_base(tmp_path) == folder and unet_weights.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-sd"]  # no temporary folders left behind


# --- shapes-sd3: the flow-matching (SD3-shaped) base ------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_pipe():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(
        shapes_base_path("shapes-sd3"), text_encoder_3=None, tokenizer_3=None
    )


def test_shipped_sd3_folder_is_small_and_has_no_t5():
    folder = shapes_base_path("shapes-sd3")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 12 * 2**20
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (folder / part).is_dir()
    assert not (folder / "text_encoder_3").exists()
    index = json.loads((folder / "model_index.json").read_text())
    assert "_name_or_path" not in index and index["text_encoder_3"] == [None, None]
    settings = shapes_base_settings(folder)
    assert settings["resolution"] == 64 and settings["vae_downsample"] == 4
    # shapes-sd's VAE, unchanged but for the shift the SD3 pipeline adds back when decoding.
    from safetensors.numpy import load_file

    weights = "vae/diffusion_pytorch_model.safetensors"
    sd_vae, sd3_vae = load_file(shapes_base_path() / weights), load_file(folder / weights)
    assert sd_vae.keys() == sd3_vae.keys() and all((sd_vae[k] == sd3_vae[k]).all() for k in sd_vae)
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert config["shift_factor"] == 0.0 and config["scaling_factor"] == 1.0


def test_sd3_loads_in_fp32_and_generates_at_64px(sd3_pipe):
    assert sd3_pipe.vae_scale_factor == 4
    assert sd3_pipe.transformer.config.sample_size * sd3_pipe.vae_scale_factor == 64
    assert {sd3_pipe.transformer.dtype, sd3_pipe.text_encoder.dtype, sd3_pipe.text_encoder_2.dtype} == {
        torch.float32
    }
    assert sd3_pipe.vae.config.scaling_factor == 1.0 and sd3_pipe.vae.config.shift_factor == 0.0
    _assert_draws_64px(sd3_pipe)


def test_sd3_controlnet_from_transformer_runs_at_64px(sd3_pipe):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    layers = sd3_pipe.transformer.config.num_layers - 1
    controlnet = SD3ControlNetModel.from_transformer(
        sd3_pipe.transformer, num_layers=layers, num_extra_conditioning_channels=0
    )
    cn_pipe = StableDiffusion3ControlNetPipeline(
        **{k: v for k, v in sd3_pipe.components.items() if k not in ("image_encoder", "feature_extractor")},
        controlnet=controlnet,
    )
    _assert_draws_64px(cn_pipe, control_image=make_sample(0, seed=0, resolution=64)["conditioning_image"])


def test_materialize_sd3_writes_fp32_text_encoders(tmp_path: Path):
    from transformers import CLIPTextModelWithProjection

    folder = materialize_shapes_base(tmp_path, "shapes-sd3")
    assert folder == tmp_path / "shapes-sd3"
    for sub in ("text_encoder", "text_encoder_2"):
        assert CLIPTextModelWithProjection.from_pretrained(folder, subfolder=sub).dtype == torch.float32
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-sd3"]
