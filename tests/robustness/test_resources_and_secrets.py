"""Resource checks, out-of-memory advice, bad data at the CLI, and secrets that never reach the run folder."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

from PIL import Image

RECIPE = """\
name: r
dataset:
  source: {builtin: shapes, num_samples: 16}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 2
  batch_size: 2
  validation: {every: 2, num_images: 1, num_rows: 1, num_inference_steps: 1}
logging: {tracker: none}
"""


def test_not_enough_disk_is_refused_before_anything_is_written(cli, write_recipe, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 1000))
    out = tmp_path / "run"
    result = cli("run", write_recipe(RECIPE), "-o", out)
    assert result.exit_code == 2
    assert "not enough disk space" in result.stderr and "GB free" in result.stderr
    assert not (out / "dataset").exists()


def test_a_gpu_with_too_little_free_memory_is_warned_about_before_training(
    write_recipe, tmp_path, monkeypatch
):
    """On a CUDA GPU whose free memory is below `recipe plan`'s estimate, the run says so before the dataset
    build and precompute spend their time (a warning: the estimate may be off, the run goes on)."""
    import torch
    from rich.console import Console

    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.estimates import estimate_memory
    from recipe_runner.run.resources import warn_accelerator_memory

    gib = 2**30
    sd15 = RECIPE.replace("builtin:tiny-sd", "stable-diffusion-v1-5/stable-diffusion-v1-5").replace(
        "64\n", "512\n"
    )
    loaded = load_recipe(
        write_recipe(sd15 + "extends: " + str(Path(__file__).parents[2] / "recipes/base/low-vram.yaml"))
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def printed(free_gib: float, stages: list[str]) -> str:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (int(free_gib * gib), 8 * gib))
        console = Console(record=True, width=400)
        warn_accelerator_memory(loaded, stages, console)
        return console.export_text()

    need = estimate_memory(loaded.recipe).total_gb
    assert 3 < need < 7.5
    warning = printed(3.0, ["dataset", "train"])
    assert f"estimates {need:.1f} GB" in warning and "3.0 of 8.0 GB free" in warning
    assert "base/low-vram.yaml" in warning and "--trace" in warning
    assert printed(7.5, ["dataset", "train"]) == ""
    assert printed(3.0, ["dataset"]) == ""  # nothing trains


def test_out_of_memory_names_the_presets_and_keeps_checkpoints(cli, write_recipe, tmp_path, monkeypatch):
    import torch

    import recipe_runner.training as training

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train_controlnet", oom, raising=False)
    monkeypatch.setattr("recipe_runner.training.stage.train_controlnet", oom)
    result = cli("run", write_recipe(RECIPE), "-o", tmp_path / "run")
    assert result.exit_code == 1
    assert "out of memory" in result.stderr
    assert "base/low-vram.yaml" in result.stderr and "--resume" in result.stderr
    assert "log is at" in result.stderr
    assert "Traceback" not in result.output


def test_corrupt_image_with_on_bad_image_error_exits_2_and_writes_no_dataset(cli, write_recipe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (80, 80), "red").save(data / "good.png")
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (data / "metadata.jsonl").write_text(
        '{"file_name": "good.png", "text": "red"}\n{"file_name": "bad.png", "text": "broken"}\n'
    )
    recipe = write_recipe(RECIPE.replace("{builtin: shapes, num_samples: 16}", "{path: data}"))
    text = recipe.read_text().replace("  resolution: 64\n", "  resolution: 64\n  columns: {prompt: text}\n")
    text = text.replace("dataset:\n", "dataset:\n  filters: {on_bad_image: error}\n")
    recipe.write_text(text)
    out = tmp_path / "run"
    result = cli("build-dataset", recipe, "-o", out)
    assert result.exit_code == 2, result.output
    assert "bad.png" in result.stderr
    assert not (out / "dataset").exists()


def test_hub_token_never_reaches_the_run_folder(cli, write_recipe, tmp_path, monkeypatch):
    secret = "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"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = write_recipe(RECIPE)
    out = tmp_path / "run"
    assert cli("build-dataset", recipe, "-o", out).exit_code == 0
    shown = cli("show", recipe)
    assert secret not in shown.output
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path
