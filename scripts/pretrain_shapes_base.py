"""Pretrain the tiny `shapes-sd` base model (VAE, text encoder, UNet) on the builtin shapes data.

The offline demo trains a ControlNet on a 2-core CPU in minutes; that only shows anything if the base
already draws the prompt's shape and colours. This script makes that base from nothing but the builtin
data, with fixed seeds, and writes a Stable Diffusion 1.x folder in diffusers format:

    .venv/bin/python scripts/pretrain_shapes_base.py --out /tmp/shapes-sd  # 30-60 min on 2 cores
    .venv/bin/python scripts/pretrain_shapes_base.py --check /tmp/shapes-sd  # grid + colour score
    .venv/bin/python scripts/pretrain_shapes_base.py --ship /tmp/shapes-sd   # fp16 into the package

Stages: (1) the VAE learns to reconstruct 64px images (4x downsampling: 16x16x4 latents); its latents are
then centred and whitened per channel by folding the statistics into quant_conv/post_quant_conv, because
StableDiffusionPipeline ignores `shift_factor` (scaling_factor is then 1.0). (2) The text encoder and the
UNet are trained together from scratch with SD's epsilon-prediction DDPM loss (scaled_linear betas), 10%
empty prompts for classifier-free guidance, min-SNR weighting and an EMA of the weights.
See docs/shapes-base.md for the figures of the shipped run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting make a busy machine 3x slower; set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from recipe_runner.data.builtin_shapes import PALETTE, make_sample
from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

RESOLUTION = 64
VAE_DOWNSAMPLE = 4
# The demo builds its rows from seed 0; a different data seed means the base never saw those outlines.
DATA_SEED = 12345
CHECK_SEED = 999
# ControlNet's conditioning embedding must downsample like the VAE: 2 ** (len - 1) == 4.
CONTROLNET_CHANNELS = [16, 32, 96]
SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
# GroupNorm with one channel per group normalises away a flat image's colour, so every norm here has
# several channels per group.
VAE_CHANNELS, VAE_GROUPS = (16, 32, 64), 4
UNET_CHANNELS, UNET_GROUPS = (32, 64, 128), 8
TEXT_WIDTH = 64


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_pool(size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Rows 0..size-1 of the builtin data as uint8 NCHW images and their prompts."""
    images = np.empty((size, RESOLUTION, RESOLUTION, 3), np.uint8)
    prompts = []
    for i in range(size):
        row = make_sample(i, seed=seed, resolution=RESOLUTION)
        images[i] = np.asarray(row["image"])
        prompts.append(row["prompt"])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), prompts


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=VAE_GROUPS,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # the latents are whitened inside the VAE, see centre_latents
        force_upcast=False,
        # Fully convolutional (no attention at 16x16): faster, and it can train on 32px crops.
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, kind: type = CLIPTextModel) -> CLIPTextModel:
    """A small CLIP text encoder for `tokenizer` (`kind`: CLIPTextModelWithProjection for SD3's)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=TEXT_WIDTH,
    )
    return kind(config)


def build_unet() -> UNet2DConditionModel:
    # Cross-attention only at 8x8 and 4x4: at 16x16 it halves the speed, and the prompt only says what
    # colours and shape to draw, not where.
    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_DOWNSAMPLE,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=UNET_GROUPS,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _crops(images: torch.Tensor, gen: torch.Generator, size: int = RESOLUTION // 2) -> torch.Tensor:
    """One random crop per image, at a multiple of the downsampling so the latent grid stays aligned; a
    fully convolutional VAE learns as much from a quarter of the pixels."""
    top, left = torch.randint((RESOLUTION - size) // VAE_DOWNSAMPLE + 1, (2,), generator=gen) * VAE_DOWNSAMPLE
    return images[:, :, top : top + size, left : left + size]


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor, device: str) -> dict[str, float]:
    """Mean absolute pixel error (0-255) and how often a pixel's nearest palette colour changes."""
    errors, flips = [], []
    for b in images.split(64):
        y = vae.decode(vae.encode(to_unit(b).to(device)).latent_dist.mode()).sample.cpu()
        y = ((y.clamp(-1, 1) + 1) * 127.5).round()
        errors.append((y - b.float()).abs().mean().item())
        for a, r in zip(b.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy(), strict=True):
            flips.append(float((palette_map(a) != palette_map(r)).mean()))
    return {"mean_abs_error": float(np.mean(errors)), "palette_flips": float(np.mean(flips))}


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, device: str) -> None:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3)
        x = to_unit(_crops(images[torch.randint(len(images), (batch,), generator=gen)], gen)).to(device)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        # MSE + L1 for sharp edges; the 8x8-pooled term weighs the flat colours, which a tiny VAE
        # otherwise shifts (purple coming back blue).
        colour = F.mse_loss(F.avg_pool2d(y, 8), F.avg_pool2d(x, 8))
        loss = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + colour + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"vae step {step}/{steps} loss {loss.item():.4f} colour {colour.item():.5f} "
                f"({time.time() - start:.0f}s)"
            )
    vae.eval()


@torch.no_grad()
def centre_latents(vae: AutoencoderKL, images: torch.Tensor, device: str) -> dict[str, list[float]]:
    """Make the VAE's latents zero-mean, unit-variance per channel by folding the measured statistics
    into the 1x1 convolutions around the latent space (SD pipelines ignore shift_factor)."""
    latents = torch.cat(
        [vae.encode(to_unit(b).to(device)).latent_dist.sample().cpu() for b in images.split(64)]
    )
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    c = mean.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    # Encoder: mean' = (mean - m) / s, logvar' = logvar - 2 log s.
    q.weight[:c] /= std.view(-1, 1, 1, 1).to(device)
    q.bias[:c] = (q.bias[:c] - mean.to(device)) / std.to(device)
    q.bias[c:] -= 2 * std.log().to(device)
    # Decoder sees z = s * z' + m.
    p.bias += p.weight[:, :, 0, 0] @ mean.to(device)
    p.weight *= std.view(1, -1, 1, 1).to(device)
    return {"mean": mean.tolist(), "std": std.tolist()}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every pool image, so UNet training never runs the VAE."""
    means, stds = [], []
    for b in images.split(128):
        dist = vae.encode(to_unit(b).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps: int,
    batch: int,
    device: str,
    on_checkpoint: Callable[[int, dict, dict], None] | None = None,
    every: int = 1000,
) -> tuple[dict, dict]:
    """Epsilon-prediction DDPM training; returns the EMA weights of the UNet and the text encoder."""
    scheduler = DDPMScheduler(**SD_BETAS)
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    # Min-SNR-5 weighting (Hang et al. 2023): converges several times faster than plain MSE.
    weight = torch.clamp(snr, max=5.0) / snr
    models = [unet.to(device).train(), text_encoder.to(device).train()]
    params = [p for m in models for p in m.parameters()]
    ema = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(2)
    mean, std = latents
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 5e-4, warmup=200)
        idx = torch.randint(len(mean), (batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device)
        tokens = ids[idx].clone()
        tokens[torch.rand(batch, generator=gen) < 0.1] = empty_ids  # 10% unconditional
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        text = text_encoder(tokens.to(device))[0]
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = (weight[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        update_ema(models, ema, step)
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if on_checkpoint is not None and (step + 1) % every == 0 and step + 1 < steps:
            on_checkpoint(step + 1, ema[0], ema[1])
    return ema[0], ema[1]


@torch.no_grad()
def update_ema(models: list[torch.nn.Module], ema: list[dict], step: int) -> None:
    """One step of the EMA of `models`' weights (decay warming up to 0.999)."""
    decay = min(0.999, (1 + step) / (10 + step))
    for m, shadow in zip(models, ema, strict=True):
        for k, v in m.state_dict().items():
            if v.dtype.is_floating_point:
                shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, info: dict) -> None:
    scheduler = DDPMScheduler(
        **SD_BETAS, prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves load-time kwargs into tokenizer_config.json; rewrite our four plain files.
    shutil.rmtree(out / "tokenizer")
    write_tiny_clip_tokenizer(out / "tokenizer")
    (out / "recipe_runner.json").write_text(json.dumps(info, indent=2) + "\n")


def pretrain(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    timings: dict[str, float] = {}
    t0 = time.time()
    images, prompts = make_pool(args.pool, DATA_SEED)
    timings["data_s"] = time.time() - t0
    log(f"pool of {len(images)} rows in {timings['data_s']:.0f}s")

    vae = build_vae()
    t0 = time.time()
    train_vae(vae, images, args.vae_steps, args.vae_batch, args.device)
    stats = centre_latents(vae, images[:1024], args.device)
    timings["vae_s"] = time.time() - t0
    stats["reconstruction"] = reconstruction_error(vae, images[-512:], args.device)
    log(f"vae trained in {timings['vae_s']:.0f}s: {stats}")

    write_tiny_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tok = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
    ids = tokenizer(prompts, return_tensors="pt", **tok).input_ids
    empty_ids = tokenizer([""], return_tensors="pt", **tok).input_ids[0]
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    t0 = time.time()
    latents = encode_pool(vae, images, args.device)

    def checkpoint(step: int, unet_state: dict, text_state: dict) -> None:
        # The EMA weights so far, as a loadable folder, to look at while training goes on.
        u, t = copy.deepcopy(unet).cpu(), copy.deepcopy(text_encoder).cpu()
        u.load_state_dict(unet_state)
        t.load_state_dict(text_state)
        save_pipeline(out / "partial", copy.deepcopy(vae), t, tokenizer, u, {"unet_step": step})

    unet_ema, text_ema = train_unet(
        unet, text_encoder, latents, ids, empty_ids, args.unet_steps, args.unet_batch, args.device, checkpoint
    )
    unet.load_state_dict(unet_ema)
    text_encoder.load_state_dict(text_ema)
    timings["unet_s"] = time.time() - t0
    log(f"text encoder + unet trained in {timings['unet_s']:.0f}s")

    count = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]
    }
    info = {
        "controlnet_conditioning_embedding_out_channels": CONTROLNET_CHANNELS,
        "vae_downsample": VAE_DOWNSAMPLE,
        "resolution": RESOLUTION,
        "pretraining": {
            "command": " ".join(["scripts/pretrain_shapes_base.py", *args.argv]),
            "seed": args.seed,
            "data_seed": DATA_SEED,
            "parameters": count,
            "raw_latent_stats": stats,
            "timings_s": {k: round(v) for k, v in timings.items()},
        },
    }
    save_pipeline(out, vae, text_encoder, tokenizer, unet, info)
    log(f"saved to {out}: {count}, timings {info['pretraining']['timings_s']}")


# --- quality check -------------------------------------------------------------------------------------

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], np.float32)
# Half the distance between the two closest palette colours (orange/yellow, ~75 apart).
COLOUR_TOLERANCE = 40.0


def palette_map(image: np.ndarray) -> np.ndarray:
    """Per pixel: the index of the nearest palette colour, or -1 when none is within the tolerance."""
    dist = np.linalg.norm(image.reshape(-1, 1, 3).astype(np.float32) - _RGB[None], axis=-1)
    nearest = dist.argmin(axis=1)
    nearest[dist.min(axis=1) > COLOUR_TOLERANCE] = -1
    return nearest.reshape(image.shape[:2])


def dominant_colours(image: np.ndarray) -> tuple[str | None, str | None]:
    """(shape colour, background colour) of a generated image: the background is the commonest palette
    colour on the 2px border, the shape the commonest other one if it covers at least 3% of the image."""
    labels = palette_map(image)
    border = np.ones(labels.shape, bool)
    border[2:-2, 2:-2] = False

    def commonest(values: np.ndarray) -> int | None:
        values = values[values >= 0]
        return int(np.bincount(values).argmax()) if values.size else None

    bg = commonest(labels[border])
    inner = labels[(labels >= 0) & (labels != (bg if bg is not None else -2))]
    shape = commonest(inner) if inner.size >= 0.03 * labels.size else None
    return (_NAMES[shape] if shape is not None else None, _NAMES[bg] if bg is not None else None)


def check(
    folder: Path,
    *,
    num: int = 16,
    steps: int = 20,
    guidance: float = 4.0,
    load: Callable | None = None,
    **call: object,
) -> float:
    """Generate `num` images for unseen prompts, save a grid (top: generated, bottom: a training-style
    image for the same prompt) and return the fraction whose shape and background colours are right.
    `load`: another way to load `folder` as a pipeline (scripts/pretrain_shapes_sd3.py's), which then
    samples with its own scheduler; `call`: more arguments for the pipeline call."""
    from diffusers import UniPCMultistepScheduler
    from PIL import Image

    if load is None:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # as training validation
    else:
        pipe = load(folder)
    pipe.set_progress_bar_config(disable=True)
    rows = [make_sample(i, seed=CHECK_SEED, resolution=RESOLUTION) for i in range(num)]
    start = time.time()
    images = pipe(
        [r["prompt"] for r in rows],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **call,
    ).images
    log(f"generated {num} images in {time.time() - start:.1f}s")
    images = (images * 255).round().astype(np.uint8)
    right = 0
    for row, image in zip(rows, images, strict=True):
        shape, bg = dominant_colours(image)
        ok = (shape, bg) == (row["color"], row["background"])
        right += ok
        print(f"{'ok ' if ok else 'BAD'} {row['prompt']!r}: got {shape} on {bg}")
    grid = Image.new("RGB", (RESOLUTION * num, RESOLUTION * 2))
    for i, (row, image) in enumerate(zip(rows, images, strict=True)):
        grid.paste(Image.fromarray(image), (i * RESOLUTION, 0))
        grid.paste(row["image"], (i * RESOLUTION, RESOLUTION))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(folder / "check_grid.png")
    accuracy = right / num
    log(f"colour accuracy {right}/{num} = {accuracy:.2f}; grid in {folder / 'check_grid.png'}")
    return accuracy


def ship(folder: Path, dest: Path) -> None:
    """Copy a pretrained folder into the package, the UNet and VAE in fp16 (half the size; diffusers loads
    them back as fp32). The text encoder stays fp32: transformers 5 would load it in fp16, and it is small."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    pipe.unet.half()
    pipe.vae.half()
    if dest.exists():
        shutil.rmtree(dest)
    pipe.save_pretrained(dest, safe_serialization=True)
    shutil.rmtree(dest / "tokenizer")
    write_tiny_clip_tokenizer(dest / "tokenizer")
    finish_ship(folder, dest)


def finish_ship(folder: Path, dest: Path) -> None:
    """What both scripts' --ship do after saving: the settings file, no machine paths, plain modes."""
    shutil.copy(folder / "recipe_runner.json", dest / "recipe_runner.json")
    index = json.loads((dest / "model_index.json").read_text())
    index.pop("_name_or_path", None)  # a path on the machine that made it
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # save_pretrained writes weights as 0600
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"shipped to {dest}: {size / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="folder to write the pretrained pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=32, help="32px crops per VAE step")
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=32768, help="builtin shapes rows to train on")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--check", type=Path, metavar="FOLDER", help="score a pretrained folder and exit")
    parser.add_argument("--check-images", type=int, default=16, help="images --check generates")
    parser.add_argument("--ship", type=Path, metavar="FOLDER", help="copy FOLDER (fp16 UNet/VAE) to --dest")
    parser.add_argument(
        "--dest", type=Path, default=Path(__file__).parents[1] / "recipe_runner/assets/shapes-sd"
    )
    args = parser.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    if args.check:
        check(args.check, num=args.check_images)
    elif args.ship:
        ship(args.ship, args.dest)
    elif args.out:
        pretrain(args)
        check(args.out, num=args.check_images)
    else:
        parser.error("give --out, --check or --ship")


if __name__ == "__main__":
    main()
