"""Full-size base architectures with random weights (no download): benchmarks, memory traces.

The configs are those of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-3.5-medium and
black-forest-labs/FLUX.1-dev (unet/ or transformer/, vae/ and scheduler/ config.json, and the text towers
of CLIP ViT-L/14, OpenCLIP ViT-H/14, OpenCLIP ViT-bigG/14 and T5 v1.1 XXL's encoder). Random weights cost
the same compute as trained ones; the tokenizer is the package's offline tiny one, which pads to the same
77 tokens (and serves T5's place too: only the token count matters for memory and time).

    ARCHS["sd15"].unet                 # a config dict, e.g. for the meta-device FLOP count
    random_models("sdxl", folder)      # tokenizers, encoders, denoiser, VAE (families/offline.py saves them)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

_UNET = {  # the keys both UNet configs share, with the same values
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
}
SD15_UNET = {
    **_UNET,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    **_UNET,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,  # pooled bigG (1280) + 6 micro-conditioning x 256
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD21_UNET = {  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction); -base differs in sample_size 64
    **_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": SD15_UNET["down_block_types"],
    "sample_size": 96,
    "up_block_types": SD15_UNET["up_block_types"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_VAE = {**_VAE, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_VAE = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_VAE16 = {  # SD3's and FLUX.1's: 16 latent channels, no quant convs, latents = (mean - shift) * scale
    **_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_VAE = {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD35_MEDIUM_TRANSFORMER = {  # 2.5B: 24 MMDiT blocks, the first 13 with a second (image-only) attention
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,  # CLIP-L's 768 + CLIP-G's 1280 pooled
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
FLUX_DEV_TRANSFORMER = {  # 11.9B: 19 double-stream and 38 single-stream blocks, guidance-distilled
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,  # 16 latent channels in 2x2 patches
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,  # CLIP-L's pooled
}
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
OPENCLIP_H_TEXT = {  # SD 2.x keeps 23 of its 24 layers (the penultimate layer's output is the embedding)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
CLIP_BIGG_TEXT = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl's encoder (4.7B), SD3's text_encoder_3 and FLUX.1's text_encoder_2
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "layer_norm_epsilon": 1e-06,
    "tie_word_embeddings": False,
}
SD_SCHEDULER = (  # SD 1.5's (training reads SDXL's Euler config as DDPM, too)
    "DDPMScheduler",
    {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "clip_sample": False,
    },
)
SD3_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0})
FLUX_SCHEDULER = (
    "FlowMatchEulerDiscreteScheduler",
    {
        "shift": 3.0,
        "use_dynamic_shifting": True,  # the shift follows the image's token count
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
)


@dataclass(frozen=True)
class Arch:
    denoiser: dict  # the UNet's or the transformer's config
    vae: dict
    text: tuple[dict, ...]  # one CLIP text tower per CLIP encoder (SDXL, SD3 have two)
    clip_classes: tuple[str, ...]  # each CLIP encoder's transformers class
    resolution: int  # the native training resolution
    family: str  # the recipe's model.family
    scheduler: tuple[str, dict]  # the noise scheduler's diffusers class and config
    t5: dict | None = None  # a T5 encoder after the CLIP ones (SD3, FLUX.1)
    denoiser_class: str = "UNet2DConditionModel"

    @property
    def unet(self) -> dict:
        """The UNet's config (the Stable Diffusion 1.x/2.x/XL architectures)."""
        assert self.denoiser_class == "UNet2DConditionModel", f"a {self.denoiser_class} has no UNet"
        return self.denoiser


TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")  # a pipeline folder's, one an encoder
_CLIP, _PROJ = "CLIPTextModel", "CLIPTextModelWithProjection"
ARCHS = {
    "sd15": Arch(SD15_UNET, SD15_VAE, (CLIP_L_TEXT,), (_CLIP,), 512, "sd1", SD_SCHEDULER),
    "sd21": Arch(
        SD21_UNET, {**SD15_VAE, "sample_size": 768}, (OPENCLIP_H_TEXT,), (_CLIP,), 768, "sd2", SD_SCHEDULER
    ),
    "sdxl": Arch(
        SDXL_UNET, SDXL_VAE, (CLIP_L_TEXT, CLIP_BIGG_TEXT), (_CLIP, _PROJ), 1024, "sdxl", SD_SCHEDULER
    ),
    "sd35m": Arch(
        SD35_MEDIUM_TRANSFORMER,
        SD3_VAE,
        (CLIP_L_TEXT, CLIP_BIGG_TEXT),
        (_PROJ, _PROJ),  # SD3 takes both CLIPs' pooled projections
        1024,
        "sd3",
        SD3_SCHEDULER,
        t5=T5_XXL_ENCODER,
        denoiser_class="SD3Transformer2DModel",
    ),
    "flux-dev": Arch(
        FLUX_DEV_TRANSFORMER,
        FLUX_VAE,
        (CLIP_L_TEXT,),
        (_CLIP,),  # FLUX.1 takes CLIP-L's pooled output, unprojected
        1024,
        "flux",
        FLUX_SCHEDULER,
        t5=T5_XXL_ENCODER,
        denoiser_class="FluxTransformer2DModel",
    ),
}


def random_models(arch: str, folder: Path) -> tuple[list, list, Any, Any]:
    """`arch`'s tokenizers (the package's tiny offline one, written into `folder`/tokenizer[_2, _3]), text
    encoders, denoiser and VAE with random weights, built on the current default device (`with
    torch.device("meta")` for shapes only)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel

    from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

    spec = ARCHS[arch]
    tokenizers, encoders = [], []
    for i in range(len(spec.text) + (spec.t5 is not None)):
        write_tiny_clip_tokenizer(folder / TOKENIZER_FOLDERS[i])
        tokenizers.append(CLIPTokenizer.from_pretrained(folder / TOKENIZER_FOLDERS[i]))
    for tokenizer, text, kind in zip(tokenizers, spec.text, spec.clip_classes, strict=False):
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        )
        encoders.append(getattr(transformers, kind)(config))
    if spec.t5 is not None:
        encoders.append(T5EncoderModel(T5Config(**spec.t5)))
    denoiser = getattr(diffusers, spec.denoiser_class)(**spec.denoiser)
    return tokenizers, encoders, denoiser, AutoencoderKL(**spec.vae)


def random_scheduler(arch: str) -> Any:
    """`arch`'s noise scheduler, as its base's scheduler/ folder configures it."""
    import diffusers

    kind, config = ARCHS[arch].scheduler
    return getattr(diffusers, kind)(**config)
