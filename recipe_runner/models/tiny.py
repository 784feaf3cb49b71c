"""Builtin tiny Stable Diffusion / SDXL / SD3 / FLUX.1 models, random-initialised and built offline.

They have the real architectures at toy sizes (like diffusers' own tests), so the whole training
path (text encoding, VAE latents, UNet + ControlNet, schedulers, saving, pipelines) runs on a CPU
in seconds without downloading anything. Only training code imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from recipe_runner.errors import UserError
from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

# Bump when a builder's output changes, so cached folders from older versions get rebuilt.
BUILD_VERSION = 1
MARKER_FILE = "recipe_runner_builtin.json"

# Latents are 8x8 at 64px: the VAE has 4 blocks (3 downsamples, 8x like real SD), which also matches
# the 8x downsampling of ControlNet's default conditioning embedding (16, 32, 96, 256).
_LATENT_SIZE = 8

# SD 1.x / SDXL noise schedule.
_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def _tokenizer(folder: Path) -> CLIPTokenizer:
    write_tiny_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _save(pipe, out_dir: Path) -> None:
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Re-write the tokenizers from scratch: transformers 5 saves load-time kwargs such as
    # local_files_only into tokenizer_config.json; our four files are all CLIPTokenizer needs.
    for name in ("tokenizer", "tokenizer_2"):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
            write_tiny_clip_tokenizer(out_dir / name)


def _text_config(tokenizer: CLIPTokenizer, **sizes: int) -> CLIPTextConfig:
    # eos_token_id must be the tokenizer's: CLIP pools the hidden state at the first EOS token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            **sizes,
        },
    )


def _vae(seed: int, *, scaling_factor: float, force_upcast: bool, **kwargs) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=_LATENT_SIZE * 8,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
        **{"latent_channels": 4, **kwargs},
    )


def _unet(seed: int, **kwargs) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=_LATENT_SIZE,  # so pipelines default to 64px images
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **kwargs,
    )


def build_tiny_sd(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a random-initialised tiny Stable Diffusion 1.x folder (diffusers format) to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = _tokenizer(out_dir / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = _unet(seed, cross_attention_dim=32, attention_head_dim=8)
    vae = _vae(seed, scaling_factor=0.18215, force_upcast=False)
    scheduler = DDPMScheduler(
        **_BETAS,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, out_dir)
    return out_dir


def build_tiny_sdxl(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a random-initialised tiny SDXL folder (two text encoders, micro-conditioning) to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = _tokenizer(out_dir / "tokenizer")
    tokenizer_2 = _tokenizer(out_dir / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 1)  # not a copy of the first encoder
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    time_embed_dim = 8
    unet = _unet(
        seed,
        # The UNet attends to both encoders' hidden states concatenated ...
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # ... and gets the pooled projection plus 6 micro-conditioning numbers (sizes and crop).
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * time_embed_dim,
    )
    vae = _vae(seed, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        **_BETAS,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    _save(pipe, out_dir)
    return out_dir


def build_tiny_sd3(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a random-initialised tiny SD3 folder: two CLIP encoders with projections (no T5: SD3 runs
    without it), an MMDiT transformer, a 16-channel VAE with SD3's shift and scale, flow-matching noise."""
    out_dir = Path(out_dir)
    tokenizer = _tokenizer(out_dir / "tokenizer")
    tokenizer_2 = _tokenizer(out_dir / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,  # a ControlNet copies all but the last (which outputs no text stream)
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # the T5 width; the CLIP embeddings (32 + 32) are padded to it
        caption_projection_dim=16,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,  # up to 256 px at this VAE's 8x
    )
    # SD3's VAE: 16 latent channels, latents = (mean - shift_factor) * scaling_factor.
    vae = _vae(seed, scaling_factor=1.5305, force_upcast=False, latent_channels=16, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    _save(pipe, out_dir)
    return out_dir


def build_tiny_flux(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a random-initialised tiny FLUX.1-dev-like folder: CLIP-L (pooled) and a T5 encoder (with the
    tiny CLIP tokenizer, so nothing is downloaded), a double- and single-stream transformer with a
    guidance embedding, a 16-channel VAE with Flux's shift and scale, flow-matching noise."""
    out_dir = Path(out_dir)
    tokenizer = _tokenizer(out_dir / "tokenizer")
    tokenizer_2 = _tokenizer(out_dir / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    config = T5Config(vocab_size=len(tokenizer_2), d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    text_encoder_2 = T5EncoderModel(config)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # the T5 width
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    )
    vae = _vae(seed, scaling_factor=0.3611, force_upcast=False, latent_channels=16, shift_factor=0.1159)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    _save(pipe, out_dir)
    return out_dir


def build_shapes_sd(out_dir: Path, *, seed: int = 0) -> Path:
    """The small pretrained base shipped for the shapes demo (see docs/shapes-base.md), in fp32."""
    from recipe_runner.models.shapes_base import write_shapes_sd

    return write_shapes_sd(out_dir, seed=seed)


def build_shapes_sd3(out_dir: Path, *, seed: int = 0) -> Path:
    """The small pretrained SD3-shaped (flow-matching) base shipped for the shapes demo, in fp32."""
    from recipe_runner.models.shapes_base import write_shapes_sd3

    return write_shapes_sd3(out_dir, seed=seed)


BUILTIN_MODELS: dict[str, Callable[..., Path]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
    "shapes-sd": build_shapes_sd,
    "shapes-sd3": build_shapes_sd3,
}


def _source_digest(name: str) -> str | None:
    """For a builtin copied from shipped weights, a digest of those files: new weights rebuild the cache."""
    from recipe_runner.models.shapes_base import SHIPPED_BASES, shapes_base_path

    if name not in SHIPPED_BASES:
        return None
    digest = hashlib.sha256()
    root = shapes_base_path(name)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _marker(name: str) -> dict:
    return {"name": name, "version": BUILD_VERSION, "source": _source_digest(name)}


def _is_current(folder: Path, name: str) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(name)


def resolve_builtin(name: str, cache_root: Path) -> Path:
    """The folder of builtin model `name` under `cache_root`, built on first use and reused after."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise UserError(f"unknown builtin model {name!r}", hint=f"builtin models are: {known}")
    cache_root = Path(cache_root)
    final = cache_root / name
    if _is_current(final, name):
        return final

    cache_root.mkdir(parents=True, exist_ok=True)
    # Build next to the final folder and rename it into place, so that an interrupted build never
    # looks complete and concurrent builders never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=cache_root))
    try:
        BUILTIN_MODELS[name](tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(name)))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        if _is_current(final, name):  # another process finished first: use theirs
            return final
        if final.exists():
            # Stale (older version or unfinished by hand): move it aside first; os.replace will not
            # overwrite a non-empty directory.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=cache_root))
            os.replace(final, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        if not _is_current(final, name):  # lost a race to another builder: fine, use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
