"""Validation grids: the ControlNet pipeline built from the components already in memory.

One row per condition: the conditioning image, then `num_images` generated images, the prompt written
underneath. Grids go to samples/step-N.png (written atomically) and to the tracker.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import DatasetDict
from diffusers import AutoencoderKL, ControlNetModel
from PIL import Image, ImageDraw, ImageOps

from recipe_runner.data.buckets import training_size
from recipe_runner.errors import UserError
from recipe_runner.families import Components
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.fonts import font_for, wrap
from recipe_runner.training.lora import plain_copy


@dataclass
class ValidationPair:
    """A validation prompt and the conditioning image it is sampled with."""

    prompt: str
    image: Image.Image


def validation_pairs(loaded: LoadedRecipe, data: DatasetDict) -> list[ValidationPair]:
    """From validation.prompts/conditioning_images, else the first `num_rows` held-out (or train) rows."""
    v = loaded.recipe.train.validation
    if v.prompts:
        n = max(len(v.prompts), len(v.conditioning_images))
        prompts = v.prompts * n if len(v.prompts) == 1 else v.prompts
        files = v.conditioning_images * n if len(v.conditioning_images) == 1 else v.conditioning_images
        out = []
        for prompt, ref in zip(prompts, files, strict=True):
            path = loaded.resolve(ref)
            try:
                out.append(ValidationPair(prompt, Image.open(path).convert("RGB")))
            except OSError as e:
                raise UserError(f"train.validation.conditioning_images: cannot read {path}: {e}") from None
        return out
    # A streaming source's dataset/ has no train split: its preview holds the stream's first rows.
    split = (
        data["holdout"]
        if "holdout" in data and len(data["holdout"])
        else data.get("train", data.get("preview"))
    )
    rows = split.select(range(min(v.num_rows, len(split))))
    return [
        ValidationPair(p, im.convert("RGB"))
        for p, im in zip(rows["prompt"], rows["conditioning_image"], strict=True)
    ]


def build_pipeline(c: Components, controlnet: ControlNetModel, vae: AutoencoderKL | None = None):
    """The family's ControlNet pipeline sharing the training components (nothing is reloaded)."""
    pipe = c.family.pipeline(c, controlnet, vae or c.vae, c.family.sampling_scheduler(c))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline(
    c: Components, controlnet: ControlNetModel, device: torch.device, dtype: torch.dtype
) -> tuple[object, contextlib.AbstractContextManager]:
    """The pipeline for sampling mid-training, and the autocast context to run it in."""
    autocast, vae = contextlib.nullcontext(), None
    if dtype != torch.float32 and device.type == "cuda":
        autocast = torch.autocast(
            "cuda", dtype=dtype
        )  # the fp32 ControlNet with the half UNet, as the reference
    elif dtype != torch.float32:
        # CPU autocast leaves some outputs (upsampling) in fp32, which the bf16 UNet's group norms reject:
        # run everything in the half dtype instead, on a plain copy so the master weights stay fp32.
        controlnet = plain_copy(controlnet).to(device, dtype=dtype).eval()
        # The SDXL pipeline casts latents for the VAE only from fp16; our fp32 SDXL VAE needs a copy too.
        vae = copy.deepcopy(c.vae).to(dtype=dtype) if c.vae.dtype != dtype else None
    return build_pipeline(c, controlnet, vae), autocast


def generate(
    loaded: LoadedRecipe,
    c: Components,
    controlnet: ControlNetModel,
    conds: list[ValidationPair],
    device: torch.device,
    dtype: torch.dtype,
) -> list[list[Image.Image]]:
    v = loaded.recipe.train.validation
    pipe, autocast = _pipeline(c, controlnet, device, dtype)
    generator = torch.Generator(device=device).manual_seed(loaded.recipe.seed)
    outputs = []
    with autocast, torch.no_grad():
        for cond in conds:
            width, height = training_size(loaded.recipe.dataset, cond.image.size)
            result = pipe(
                cond.prompt,
                **c.family.sampling_kwargs(cond.image),
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                num_images_per_prompt=v.num_images,
                height=height,
                width=width,
                generator=generator,
            )
            outputs.append(list(result.images))
    return outputs


def evaluates_at_validation(loaded: LoadedRecipe, data: DatasetDict) -> bool:
    spec = loaded.recipe.evaluate
    return spec.enabled and spec.at_validation and "holdout" in data and len(data["holdout"]) > 0


def evaluate_now(
    loaded: LoadedRecipe,
    c: Components,
    controlnet: ControlNetModel,
    condition: object,
    data: DatasetDict,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float | None]:
    """`evaluate.at_validation`: the evaluate stage's scores of the ControlNet as it is now, on the
    held-out rows (no base-model baseline: that does not change while training)."""
    from recipe_runner.evaluate.stage import evaluate_pipeline, reference_for

    recipe = loaded.recipe
    pipe, autocast = _pipeline(c, controlnet, device, dtype)
    with autocast, torch.no_grad():
        out = evaluate_pipeline(
            pipe,
            None,
            list(data["holdout"]),
            condition,
            recipe.evaluate,
            recipe.seed,
            shapes=recipe.dataset.source.builtin == "shapes",
            reference=reference_for(loaded),
            control_kwargs=c.family.sampling_kwargs,
        )
    return out["mean"]["ours"]


def make_grid(conds: list[ValidationPair], images: list[list[Image.Image]], resolution: int) -> Image.Image:
    """Rows of [conditioning | outputs...] with the prompt written under each row."""
    columns = 1 + max(len(row) for row in images)
    width = columns * resolution
    font_size = max(10, resolution // 10)
    prompts = [c.prompt or "(empty prompt)" for c in conds]
    fonts = [font_for(prompt, font_size) for prompt in prompts]
    captions = [wrap(p, font, width - 8, max_lines=3) for p, font in zip(prompts, fonts, strict=True)]
    line = font_size + 4
    heights = [resolution + line * len(cap) + 6 for cap in captions]
    grid = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for cond, row, caption, font, height in zip(conds, images, captions, fonts, heights, strict=True):
        for i, image in enumerate([cond.image, *row]):
            # Bucketed images keep their aspect ratio in their square tile.
            tile = ImageOps.pad(image.convert("RGB"), (resolution, resolution), color="white")
            grid.paste(tile, (i * resolution, y))
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
