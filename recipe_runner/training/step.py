"""One micro-step's inputs, randomness and loss, with the semantics of diffusers' train_controlnet.py.

Randomness is drawn per sample from a generator seeded by (seed, micro-step, global position in the
batch), on the CPU: the same sample gets the same noise whatever the process count, device or
resume point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recipe_runner.families import Components
from recipe_runner.families.stable_diffusion import min_snr_weights
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.training.encoding import encode_pixels, encode_prompts, sample_latents
from recipe_runner.training.keys import derive_seed
from recipe_runner.training.precompute import EncodedCache


@dataclass
class Draws:
    """Per-sample random choices of one micro-step."""

    empty_prompt: torch.Tensor  # (b,) bool: replace the prompt with ""
    timesteps: torch.Tensor  # (b,) long in [0, num_train_timesteps)
    latent_noise: torch.Tensor  # (b, C, h, w): latents = mean + std * latent_noise
    noise: torch.Tensor  # (b, C, h, w): the noise the model learns to predict
    offset: torch.Tensor | None = None  # (b, C, 1, 1): train.noise_offset's per-channel constants


def draw(
    seed: int,
    micro_step: int,
    positions: list[int],
    latent_shape: tuple[int, ...],
    num_timesteps: int,
    empty_ratio: float,
    *,
    offset: bool = False,
    sample_timestep: Callable[[torch.Generator], torch.Tensor] | None = None,
) -> Draws:
    """`sample_timestep`: the family's draw (ModelFamily.timestep_sampler); None: uniform indices."""
    if sample_timestep is None:
        sample_timestep = lambda g: torch.randint(0, num_timesteps, (1,), generator=g)  # noqa: E731
    empty, steps, latent_noise, noise, offsets = [], [], [], [], []
    for position in positions:
        g = torch.Generator().manual_seed(derive_seed(seed, "sample", micro_step, position))
        empty.append(bool(torch.rand((), generator=g) < empty_ratio))
        steps.append(sample_timestep(g))
        latent_noise.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        if offset:  # drawn last, so that the draws before it are those of a run without offset noise
            offsets.append(torch.randn((latent_shape[0], 1, 1), generator=g))
    return Draws(
        torch.tensor(empty),
        torch.cat(steps).long(),
        torch.stack(latent_noise),
        torch.stack(noise),
        torch.stack(offsets) if offset else None,
    )


@dataclass
class StepInputs:
    """What the denoiser sees, before noise: latent distribution, text and conditioning image."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    conditioning: torch.Tensor
    control_latents: torch.Tensor | None = None  # precomputed, for families whose ControlNet takes latents


def inputs_from_cache(
    cache: EncodedCache, batch: dict, draws: Draws, device: torch.device, dtype: torch.dtype
) -> StepInputs:
    rows = batch["index"].numpy()
    prompt = np.where(draws.empty_prompt.numpy(), EncodedCache.EMPTY, cache.prompt_index[rows])

    def take(array: np.ndarray, index: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array[index])).to(device, dtype, non_blocking=True)

    mean, std = cache.latents(rows)
    controls = cache.controls(rows)
    return StepInputs(
        torch.from_numpy(mean).to(device, dtype, non_blocking=True),
        torch.from_numpy(std).to(device, dtype, non_blocking=True),
        take(cache.prompt_embeds, prompt),
        take(cache.pooled, prompt) if cache.pooled is not None else None,
        batch["conditioning"].to(device, non_blocking=True),
        torch.from_numpy(controls).to(device, dtype, non_blocking=True) if controls is not None else None,
    )


def inputs_by_encoding(
    c: Components, batch: dict, draws: Draws, device: torch.device, dtype: torch.dtype
) -> StepInputs:
    """Reference mode: run the VAE and the text encoder(s) on this batch."""
    prompts = [
        "" if empty else p for p, empty in zip(batch["prompt"], draws.empty_prompt.tolist(), strict=True)
    ]
    mean, std = encode_pixels(c, batch["pixels"])
    embeds, pooled = encode_prompts(c, prompts)
    return StepInputs(
        mean.to(device, dtype),
        std.to(device, dtype),
        embeds.to(device, dtype),
        pooled.to(device, dtype) if pooled is not None else None,
        batch["conditioning"].to(device, non_blocking=True),
    )


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE in fp32 (tests replace this to inject a NaN)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def controlnet_loss(
    c: Components,
    controlnet: torch.nn.Module,
    inputs: StepInputs,
    draws: Draws,
    recipe: Recipe,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Noise the latents at random timesteps and score the denoiser+ControlNet's prediction."""
    assert c.denoiser is not None
    device = inputs.latent_mean.device
    latents = sample_latents(c, inputs.latent_mean, inputs.latent_std, draws.latent_noise).to(dtype)
    noise = draws.noise
    if draws.offset is not None:
        noise = noise + recipe.train.noise_offset * draws.offset  # as diffusers' scripts: noise += offset
    noise = noise.to(device, dtype)
    timesteps = draws.timesteps.to(device)
    noisy, target = c.family.noisy_and_target(c, latents, noise, timesteps, recipe)
    prediction = c.family.predict(c, controlnet, noisy, timesteps, inputs, recipe, dtype)
    weights = c.family.loss_weights(c, timesteps, recipe)
    if weights is None:
        return diffusion_loss(prediction, target)
    return weighted_loss(prediction, target, weights)


def weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE times its weight (train.snr_gamma's Min-SNR, SD3's cosmap ...), then averaged."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=list(range(1, prediction.ndim))
    )
    return (per_sample * weights.to(per_sample.device)).mean()


def min_snr_loss(
    prediction: torch.Tensor, target: torch.Tensor, c: Components, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-sample MSE weighted by min(SNR, gamma) / SNR (v-prediction: / (SNR + 1)), then averaged: the
    weighting of diffusers' train_text_to_image.py with --snr_gamma."""
    weights = min_snr_weights(c.noise_scheduler, c.prediction_type, timesteps, gamma)
    return weighted_loss(prediction, target, weights)
