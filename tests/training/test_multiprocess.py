"""launch.num_processes > 1: the same recipe trains in two gloo processes on the CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.training import train_controlnet


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("base", ["builtin:tiny-sd", "builtin:tiny-sd3", "builtin:tiny-flux"])
def test_two_processes_match_one_at_the_same_global_batch(make_run, base):
    loaded, one = make_run("train.max_steps=3", "train.batch_size=4", f"model.base={base}", name="one")
    single = train_controlnet(loaded, one)

    loaded, two = make_run(
        "train.max_steps=3", "train.batch_size=2", "launch.num_processes=2", f"model.base={base}", name="two"
    )
    double = train_controlnet(loaded, two)

    assert double["processes"] == 2 and double["images_per_step"] == single["images_per_step"] == 4
    assert double["steps"] == 3 and (two.controlnet / "config.json").is_file()
    assert (two.samples / "step-3.png").is_file() and two.model_card.is_file()
    for (_, a), (_, b) in zip(single["losses"], double["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    a = load_file(one.controlnet / "diffusion_pytorch_model.safetensors")
    b = load_file(two.controlnet / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_of_the_cli_trains_with_every_rank(tmp_path):
    """`accelerate launch -m recipe_runner train FILE`: rank 0 builds and prepares once, both ranks train,
    and a second launch with nothing to do lets every rank leave."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: acc\ndataset: {source: {builtin: shapes, num_samples: 24}, resolution: 64}\n"
        "model: {base: 'builtin:tiny-sd'}\n"
        "train: {max_steps: 2, batch_size: 2, validation: {every: 2, num_images: 1, num_rows: 1, "
        "num_inference_steps: 1}}\nlogging: {tracker: none}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "recipe_runner",
        "train",
        str(recipe),
        "-o",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "2 process(es)" in log
    assert "train: skipped" in log


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launched_workers_write_what_they_print_to_the_log(tmp_path):
    """With launch.num_processes > 1, rank 0's training output reaches log.txt as a one-process run's does,
    and `--quiet` keeps it off the terminal."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: mp\ndataset: {source: {builtin: shapes, num_samples: 24}, resolution: 64}\n"
        "model: {base: 'builtin:tiny-sd'}\nlaunch: {num_processes: 2}\n"
        "train: {max_steps: 2, batch_size: 2, validation: {every: 2, num_images: 1, num_rows: 1, "
        "num_inference_steps: 1}}\nlogging: {tracker: none}\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "recipe_runner", "train", str(recipe), "-o", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "training 2 steps (from scratch), batch 2 x 1 accumulated x 2 process(es)" in log
    assert "training 2 steps" not in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("base", ["builtin:tiny-sd", "builtin:tiny-flux"])
def test_two_processes_share_the_precompute_and_write_the_cache_one_would(make_run, shapes_data, base):
    """Each process encodes every other batch of rows into the one cache rank 0 allocates and completes:
    the same folder, files and values as one process, and no copy or temporary left per rank. (4 steps:
    every row is drawn, so neither encodes only the rows of a shorter run.)"""
    import io

    import numpy as np
    from rich.console import Console

    caches = {}
    for n in (1, 2):
        loaded, folder = make_run(
            "train.max_steps=4",
            "train.batch_size=2",
            f"launch.num_processes={n}",
            f"model.base={base}",
            name=f"processes-{n}",
            data=shapes_data,  # a cache folder of its own, not the session's shared one
        )
        console = Console(file=io.StringIO(), width=400)
        results = train_controlnet(loaded, folder, console=console)
        assert results["precomputed"] and results["processes"] == n
        (caches[n],) = folder.cache.iterdir()
        said = console.file.getvalue() + (folder.log.read_text() if folder.log.exists() else "")
        assert "precomputed 8 latents" in said and (", shared by 2 processes" in said) is (n == 2)
    one, two = caches[1], caches[2]
    assert one.name == two.name
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert "control_latents.npy" in files if base == "builtin:tiny-flux" else "latent_std.npy" in files
    for name in (f for f in files if f.endswith(".npy")):
        a, b = np.load(one / name), np.load(two / name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6), name
        assert np.abs(a).sum() > 0, name  # written, not the allocation's zeros
