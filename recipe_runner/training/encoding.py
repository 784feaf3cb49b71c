"""Text and image encoding exactly as diffusers' train_controlnet(_sdxl).py does it.

Used twice with the same code: once per dataset by the precompute cache, and every step in reference
mode (`train.precompute: false`), so both modes see the same embeddings and latent distributions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from rich.markup import escape

from recipe_runner.families import Components, family_of
from recipe_runner.recipe.recipe import Recipe

if TYPE_CHECKING:
    from rich.console import Console


def overlong_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts the text encoder will see truncated (longer than its token window)."""
    limit = tokenizer.model_max_length
    lengths = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
    return [p for p, ids in zip(prompts, lengths, strict=True) if len(ids) > limit]


def warn_overlong(c: Components, prompts: list[str], console: Console | None) -> None:
    """Over-long captions are truncated (as in the reference script); say so instead of doing it silently.
    Called once per run on the distinct prompts: by the precompute cache, or before reference-mode steps."""
    long = overlong_prompts(c.tokenizers[0], prompts)
    if not long:
        return
    limit = c.tokenizers[0].model_max_length
    example = long[0] if len(long[0]) <= 80 else long[0][:77] + "..."
    message = (
        f"{len(long)} of {len(prompts)} distinct prompts are longer than the text encoder's {limit} tokens "
        f"and are truncated, e.g. {example!r}"
    )
    logging.getLogger("recipe_runner").warning(message)
    if console:
        console.print(f"[yellow]warning:[/] {escape(message)}")


@torch.no_grad()
def encode_prompts(c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings (batch, tokens, width) and the pooled embeddings (None if the family has none)."""
    return c.family.encode_prompts(c, prompts)


@torch.no_grad()
def encode_pixels(c: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for images in [-1, 1] (batch, 3, H, W).

    A step samples `mean + std * noise` with its own generator, which is what latent_dist.sample() does.
    """
    dist = c.vae.encode(pixels.to(c.vae.device, dtype=c.vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(c: Components, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled latents from the distribution parameters and the step's latent noise."""
    latents = mean + std * noise.to(mean.device, mean.dtype)
    shift = getattr(c.vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * c.vae.config.scaling_factor


def vae_dtype(recipe: Recipe, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: the half one under mixed precision, unless the family keeps its VAE in fp32."""
    return family_of(recipe).vae_dtype(recipe, weight_dtype)


def move(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """`.to(device)`, then `.to(dtype)` only when it changes something (diffusers warns on every cast)."""
    model.to(device)
    if model.dtype != dtype:
        model.to(dtype=dtype)


def place_encoders(
    c: Components, recipe: Recipe, device: torch.device | str, weight_dtype: torch.dtype
) -> None:
    """Move the VAE and text encoders to `device` (frozen, in the half dtype when mixed precision is on)."""
    move(c.vae.requires_grad_(False), device, vae_dtype(recipe, weight_dtype))
    for encoder in c.text_encoders:
        move(encoder.requires_grad_(False), device, weight_dtype)
