"""A tiny SD ControlNet trains on the CPU and leaves a complete run folder behind."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from rich.console import Console

from recipe_runner.data.builtin_shapes import make_sample
from recipe_runner.families.loading import resolve_base
from recipe_runner.training import train_controlnet


def test_tiny_sd_trains_and_leaves_a_complete_run_folder(make_run, capsys):
    loaded, folder = make_run(
        "train.max_steps=10",
        "train.checkpoint_every=3",
        "train.checkpoints_total_limit=2",
        "train.validation.every=5",
        "logging.tracker=tensorboard",
    )
    # --resume on a new folder starts from step 0 and says so.
    results = train_controlnet(loaded, folder, resume=True, console=Console(width=200))
    out = capsys.readouterr().out
    assert "no checkpoint" in out and "training done" in out
    assert results["resumed_from"] is None

    assert results["steps"] == 10 and results["steps_this_run"] == 10
    assert math.isfinite(results["final_loss"])
    assert all(math.isfinite(loss) for _, loss in results["losses"]) and len(results["losses"]) == 10
    assert results["steps_per_second"] > 0 and results["images_per_second"] == pytest.approx(
        2 * results["steps_per_second"]
    )
    assert results["peak_memory_host_mb"] > 0

    # Checkpoints at 3, 6, 9 and the end (10); only the newest two are kept, all complete.
    names = sorted(p.name for p in folder.checkpoints.iterdir())
    assert names == ["step-10", "step-9"]
    assert all((folder.checkpoints / n / ".complete").is_file() for n in names)
    assert (folder.samples / "step-5.png").is_file() and (folder.samples / "step-10.png").is_file()
    assert list(folder.logs.rglob("events.out.tfevents.*"))

    card = folder.model_card.read_text()
    # Hub metadata: no base_model for a builtin (it is no hub repo), the builtin's license
    assert card.startswith("---\nlicense: apache-2.0\n") and "base_model" not in card.split("---")[1]
    assert "- controlnet" in card and "library_name: diffusers" in card and "- diffusers-training" in card
    assert "samples/step-10.png" in card and "max_steps: 10" in card

    controlnet = ControlNetModel.from_pretrained(folder.controlnet)
    assert list(folder.controlnet.glob("*.safetensors"))
    base = resolve_base(loaded, folder.models_cache)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    row = make_sample(0, seed=0, resolution=64)
    out = pipe(row["prompt"], image=row["conditioning_image"], num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    # The ControlNet learned something: its zero-initialised output convolutions moved.
    assert any(torch.count_nonzero(b.weight) for b in controlnet.controlnet_down_blocks)


def test_one_process_loads_the_base_model_once(make_run, shapes_data, monkeypatch):
    """The precompute and the training session share one load (they loaded the VAE and the text
    encoders twice: seconds and a second copy in memory on a real base)."""
    from recipe_runner.families.stable_diffusion import StableDiffusion

    loads = []
    original = StableDiffusion.load

    def counted(self, *args, **kwargs):
        loads.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "load", counted)
    loaded, folder = make_run("train.max_steps=2", data=shapes_data)  # its own, empty precompute cache
    results = train_controlnet(loaded, folder)
    assert results["precomputed"] and list(folder.cache.iterdir())
    assert len(loads) == 1 and loads[0]["weights"] and loads[0]["denoiser"], loads
    assert results["precompute_seconds"] > 0  # timed, in the results and so in the lock
