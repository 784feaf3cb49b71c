"""Tiny trained runs to export: `recipe run` on builtin:tiny-sd, trained once per test session."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

RECIPE = """\
name: tiny
seed: 0
dataset:
  source: {builtin: shapes, num_samples: 6}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 3
  batch_size: 2
  learning_rate: 1.0e-3
  checkpoint_every: 100
  validation: {every: 1000, num_images: 1, num_rows: 1, num_inference_steps: 1, guidance_scale: 1.0}
logging: {tracker: none}
"""


def run_cli(*args: object):
    from recipe_runner.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def train(root: Path, *overrides: str, name: str = "run") -> Path:
    recipe = root / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(RECIPE))
    folder = root / name
    sets = [a for o in overrides for a in ("--set", o)]
    result = run_cli("run", recipe, "-o", folder, "--quiet", *sets)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully trained run (every weight moved from the base UNet's)."""
    return train(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.lora run (rank 4), its adapter left in adapter/."""
    return train(tmp_path_factory.mktemp("lora"), "train.lora={rank: 4, alpha: 8}")


def controlnet_inputs(controlnet) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, controlnet.config.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, controlnet.config.cross_attention_dim, generator=g),
        "controlnet_cond": torch.rand(2, 3, 64, 64, generator=g),
        "return_dict": False,
    }


def outputs(controlnet, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = controlnet.float()(**inputs)
    return [*down, mid]


def max_abs_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def base_unet(run: Path):
    from diffusers import UNet2DConditionModel

    from recipe_runner.models.tiny import resolve_builtin
    from recipe_runner.runfolder.layout import RunFolder

    cache = RunFolder(run).models_cache
    return UNet2DConditionModel.from_pretrained(resolve_builtin("tiny-sd", cache), subfolder="unet")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
