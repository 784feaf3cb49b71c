"""SIGTERM to a real `recipe run`: the step finishes, a checkpoint is written, exit 130 says how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

RECIPE = """\
name: sig
dataset:
  source: {builtin: shapes, num_samples: 24}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 100000
  batch_size: 2
  checkpoint_every: 100000
  validation: {every: 100000, num_images: 1, num_rows: 1, num_inference_steps: 1}
logging: {tracker: none}
"""


def test_sigterm_checkpoints_and_exits_130(write_recipe, tmp_path):
    recipe = write_recipe(RECIPE)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipe_runner", "run", str(recipe), "-o", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = out / "log.txt"
        if log.exists() and "training " in log.read_text():
            break
        time.sleep(0.5)
    time.sleep(2)  # some steps in
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert "Traceback" not in err
    checkpoints = [p for p in (out / "checkpoints").glob("step-*") if (p / ".complete").exists()]
    assert checkpoints, "a checkpoint is written on SIGTERM"


def test_wandb_without_the_package_names_the_extra(cli, write_recipe, tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    recipe = write_recipe(RECIPE.replace("tracker: none", "tracker: wandb").replace("100000", "2"))
    result = cli("run", recipe, "-o", tmp_path / "run")
    assert result.exit_code == 2
    assert "recipe-runner[wandb]" in result.stderr
