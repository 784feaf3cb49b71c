"""train.snr_gamma and train.noise_offset: the loss options of diffusers' and kohya's scripts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from recipe_runner.training import train_controlnet
from recipe_runner.training.step import diffusion_loss, draw, min_snr_loss


def _components(prediction_type: str = "epsilon") -> SimpleNamespace:
    return SimpleNamespace(
        noise_scheduler=DDPMScheduler(prediction_type=prediction_type), prediction_type=prediction_type
    )


def _reference_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, vpred: bool
) -> torch.Tensor:
    """diffusers' train_text_to_image.py, written out: min(snr, gamma) / snr, or / (snr + 1)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    return weights / (snr + 1) if vpred else weights / snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_as_diffusers_does(prediction_type):
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([1, 50, 400, 999])
    c = _components(prediction_type)
    weights = _reference_weights(c.noise_scheduler, timesteps, 5.0, prediction_type == "v_prediction")
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    loss = min_snr_loss(prediction, target, c, timesteps, 5.0)
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-6)
    # Low-noise timesteps (high SNR) are weighted down, the noisiest are not (epsilon: weight 1).
    assert weights[0] < weights[1] < 1 or prediction_type == "v_prediction"


def test_min_snr_with_a_gamma_above_every_snr_is_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 500, 999])
    loss = min_snr_loss(prediction, target, _components(), timesteps, 1e9)
    assert loss.item() == pytest.approx(diffusion_loss(prediction, target).item(), rel=1e-6)


def test_offset_noise_is_drawn_after_the_other_draws():
    """Turning offset noise on changes no other draw: the same timesteps, prompts and noise as without."""
    plain = draw(7, 3, [0, 1], (4, 8, 8), 1000, 0.5)
    offset = draw(7, 3, [0, 1], (4, 8, 8), 1000, 0.5, offset=True)
    assert plain.offset is None and offset.offset.shape == (2, 4, 1, 1)
    assert torch.equal(plain.timesteps, offset.timesteps) and torch.equal(plain.noise, offset.noise)
    assert torch.equal(plain.empty_prompt, offset.empty_prompt)
    assert torch.equal(plain.latent_noise, offset.latent_noise)


def test_loss_options_train_and_change_the_loss(make_run):
    losses = {}
    for name, overrides in {
        "plain": (),
        "snr": ("train.snr_gamma=0.01",),  # below the SNR of nearly every timestep
        "offset": ("train.noise_offset=0.5",),
    }.items():
        loaded, folder = make_run("train.max_steps=2", *overrides, name=name)
        losses[name] = [v for _, v in train_controlnet(loaded, folder)["losses"]]
    assert all(math.isfinite(v) for run in losses.values() for v in run)
    assert losses["snr"][0] != pytest.approx(losses["plain"][0], rel=1e-3)
    assert losses["offset"][0] != pytest.approx(losses["plain"][0], rel=1e-3)


@pytest.mark.parametrize(
    ("field", "value"), [("snr_gamma", "0"), ("noise_offset", "-0.1"), ("noise_offset", "2")]
)
def test_out_of_range_loss_options_are_refused(cli, write_recipe, field, value):
    path = write_recipe(
        f"""\
        name: t
        dataset: {{source: {{builtin: shapes}}, resolution: 64}}
        model: {{base: builtin:tiny-sd}}
        train:
          {field}: {value}
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 2 and f"train.{field}" in result.output and f"{path.name}:5:" in result.output
