"""Validation grids: the ControlNet pipeline built from the components already in memory.

One row per condition: the conditioning image, then `num_images` generated images, the prompt written
underneath. Grids go to samples/step-N.png (written atomically) and to the tracker.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import DatasetDict
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageDraw, ImageFont

from recipe_runner.errors import UserError
from recipe_runner.recipe.checks import resolve_path
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.training.components import Components


@dataclass
class Condition:
    prompt: str
    image: Image.Image


def conditions(loaded: LoadedRecipe, data: DatasetDict) -> list[Condition]:
    """From validation.prompts/conditioning_images, else the first `num_rows` held-out (or train) rows."""
    v = loaded.recipe.train.validation
    if v.prompts:
        n = max(len(v.prompts), len(v.conditioning_images))
        prompts = v.prompts * n if len(v.prompts) == 1 else v.prompts
        files = v.conditioning_images * n if len(v.conditioning_images) == 1 else v.conditioning_images
        out = []
        for prompt, ref in zip(prompts, files, strict=True):
            path = resolve_path(loaded, ref)
            try:
                out.append(Condition(prompt, Image.open(path).convert("RGB")))
            except OSError as e:
                raise UserError(f"train.validation.conditioning_images: cannot read {path}: {e}") from None
        return out
    split = data["holdout"] if "holdout" in data and len(data["holdout"]) else data["train"]
    rows = split.select(range(min(v.num_rows, len(split))))
    return [
        Condition(p, im.convert("RGB"))
        for p, im in zip(rows["prompt"], rows["conditioning_image"], strict=True)
    ]


def build_pipeline(c: Components, controlnet: ControlNetModel):
    """A diffusers ControlNet pipeline sharing the training components (nothing is reloaded)."""
    scheduler = UniPCMultistepScheduler.from_config(c.noise_scheduler.config)
    if c.family == "sdxl":
        pipe = StableDiffusionXLControlNetPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0],
            tokenizer_2=c.tokenizers[1],
            unet=c.unet,
            controlnet=controlnet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionControlNetPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            unet=c.unet,
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    loaded: LoadedRecipe,
    c: Components,
    controlnet: ControlNetModel,
    conds: list[Condition],
    device: torch.device,
    dtype: torch.dtype,
) -> list[list[Image.Image]]:
    v = loaded.recipe.train.validation
    res = loaded.recipe.dataset.resolution
    pipe = build_pipeline(c, controlnet)
    generator = torch.Generator(device=device).manual_seed(loaded.recipe.seed)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    outputs = []
    with autocast, torch.no_grad():
        for cond in conds:
            result = pipe(
                cond.prompt,
                image=cond.image,
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                num_images_per_prompt=v.num_images,
                height=res,
                width=res,
                generator=generator,
            )
            outputs.append(list(result.images))
    return outputs


def make_grid(conds: list[Condition], images: list[list[Image.Image]], resolution: int) -> Image.Image:
    """Rows of [conditioning | outputs...] with the prompt written under each row."""
    columns = 1 + max(len(row) for row in images)
    width = columns * resolution
    font_size = max(10, resolution // 10)
    font = ImageFont.load_default(size=font_size)
    chars = max(8, int(width / (0.6 * font_size)))
    captions = [textwrap.wrap(c.prompt or "(empty prompt)", chars)[:3] for c in conds]
    line = font_size + 4
    heights = [resolution + line * len(cap) + 6 for cap in captions]
    grid = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for cond, row, caption, height in zip(conds, images, captions, heights, strict=True):
        for i, image in enumerate([cond.image, *row]):
            grid.paste(image.convert("RGB").resize((resolution, resolution)), (i * resolution, y))
        for k, text in enumerate(caption):
            draw.text((4, y + resolution + 3 + k * line), text, fill="black", font=font)
        y += height
    return grid


def save_grid(grid: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def log_grid(accelerator: Accelerator, grid: Image.Image, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(grid)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, step)
