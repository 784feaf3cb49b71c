"""Full-size Stable Diffusion architectures with random weights (no download): benchmarks, memory traces.

The configs are those of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0 (unet/ and vae/ config.json, and the text towers of CLIP ViT-L/14,
OpenCLIP ViT-H/14 and OpenCLIP ViT-bigG/14). Random weights cost the same compute as trained ones; the
tokenizer is the package's offline tiny one, which pads to the same 77 tokens.

    ARCHS["sd15"].unet                 # a config dict, e.g. for the meta-device FLOP count
    random_models("sdxl", folder)      # tokenizers, text encoders, UNet, VAE (families/offline.py saves them)
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


@dataclass(frozen=True)
class Arch:
    unet: dict
    vae: dict
    text: tuple[dict, ...]  # one text tower per encoder (SDXL has two)
    resolution: int  # the native training resolution
    family: str  # the recipe's model.family


TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")  # a pipeline folder's names, one per text encoder
ARCHS = {
    "sd15": Arch(SD15_UNET, SD15_VAE, (CLIP_L_TEXT,), 512, "sd1"),
    "sd21": Arch(SD21_UNET, {**SD15_VAE, "sample_size": 768}, (OPENCLIP_H_TEXT,), 768, "sd2"),
    "sdxl": Arch(SDXL_UNET, SDXL_VAE, (CLIP_L_TEXT, CLIP_BIGG_TEXT), 1024, "sdxl"),
}


def random_models(arch: str, folder: Path) -> tuple[list, list, Any, Any]:
    """`arch`'s tokenizers (the package's tiny offline one, written into `folder`/tokenizer[_2]), text
    encoders, UNet and VAE with random weights, built on the current default device (`with
    torch.device("meta")` for shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

    spec = ARCHS[arch]
    tokenizers, encoders = [], []
    for i, text in enumerate(spec.text):
        name = TOKENIZER_FOLDERS[i]
        write_tiny_clip_tokenizer(folder / name)
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        )
        encoders.append((CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(config))
        tokenizers.append(tokenizer)
    return tokenizers, encoders, UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae)
