"""FLOPs per training step from torch's flop counter, and model-FLOPs utilisation on a GPU.

    python benchmarks/flops.py --arch sd15              # 512 px, counted on the meta device: no compute
    python benchmarks/flops.py --arch sdxl              # 1024 px

Counts one image through ControlNet + UNet forward and backward (what a precomputed step runs) and one
VAE encode (what the reference script adds to every step). Models are built on the meta device, so the
count needs no memory and no time, and no weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import recipe_runner  # noqa: F401  (before diffusers: it quiets bitsandbytes' import warning)
from recipe_runner.models.archs import ARCHS

# Dense bf16/fp16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
UNET_ARCHS = [name for name, a in ARCHS.items() if a.denoiser_class == "UNet2DConditionModel"]
ARCH_NAMES = ["tiny-sd", "shapes-sd", *UNET_ARCHS]  # the ControlNet step of a UNet


def _configs(arch: str) -> tuple[dict, dict]:
    if arch in ARCHS:
        return ARCHS[arch].unet, ARCHS[arch].vae
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from recipe_runner.models.tiny import BUILTIN_MODELS

    with tempfile.TemporaryDirectory() as tmp:
        folder = BUILTIN_MODELS[arch](Path(tmp) / arch)
        return (
            dict(UNet2DConditionModel.load_config(folder / "unet")),
            dict(AutoencoderKL.load_config(folder / "vae")),
        )


def count(arch: str, resolution: int) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_cfg, vae_cfg = _configs(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = (16, 32, 96, 256)[: factor.bit_length()]
        controlnet = ControlNetModel.from_unet(
            unet, load_weights_from_unet=False, conditioning_embedding_out_channels=channels
        )
        side = resolution // factor
        latents = torch.randn(1, 4, side, side)
        cond = torch.randn(1, 3, resolution, resolution)
        tokens = 77 if arch in ARCHS else 16
        text = torch.randn(1, tokens, unet.config.cross_attention_dim)
        t = torch.tensor([500])
        image = torch.randn(1, 3, resolution, resolution)
        added = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and 6 size/crop numbers
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            added["added_cond_kwargs"] = {
                "text_embeds": torch.randn(1, pooled),
                "time_ids": torch.randn(1, 6),
            }
    unet.requires_grad_(False)
    with FlopCounterMode(display=False) as step:
        down, mid = controlnet(
            latents, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False, **added
        )
        pred = unet(
            latents,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **added,
        ).sample
        pred.float().pow(2).mean().backward()
    with FlopCounterMode(display=False) as encode, torch.no_grad():
        vae.encode(image)
    return {
        "train_step_tflop_per_image": step.get_total_flops() / 1e12,
        "vae_encode_tflop_per_image": encode.get_total_flops() / 1e12,
    }


def mfu(images_per_second: float, tflop_per_image: float, device_name: str) -> float | None:
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    return images_per_second * tflop_per_image / peak if peak else None


def default_resolution(arch: str) -> int:
    return ARCHS[arch].resolution if arch in ARCHS else 64


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCH_NAMES, default="sd15")
    parser.add_argument("--resolution", type=int, default=None)
    args = parser.parse_args(argv)
    resolution = args.resolution or default_resolution(args.arch)
    result = {"arch": args.arch, "resolution": resolution, **count(args.arch, resolution)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
