"""Kill a real `recipe run` with SIGKILL at random moments, resume, and get bit-identical weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_runner.run.reproduce import compare_weights

RECIPE = """\
name: killme
seed: 5
dataset:
  source: {builtin: shapes, num_samples: 40}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 120
  batch_size: 2
  gradient_accumulation_steps: 2
  learning_rate: 1.0e-4
  checkpoint_every: 7
  checkpoints_total_limit: 2
  validation: {every: 120, num_images: 1, num_rows: 1, num_inference_steps: 1, guidance_scale: 1.0}
logging: {tracker: none}
"""


def _recipe_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipe_runner", "run", str(recipe), "-o", str(out), "--quiet", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _kill_and_resume(recipe: Path, out: Path, kills: int, rng: random.Random, run_seconds: float) -> int:
    """Start, SIGKILL after a random delay, repeat `kills` times, then let a resumed run finish.

    Delays are drawn over the uninterrupted run's own duration (start-up included), not fixed seconds:
    a faster machine or faster training must not let every run finish before its kill. At most 0.75 of
    it: a run as fast as the reference's, on a machine whose load fell, still meets its kill (at 0.85 both
    kills of one try missed)."""
    killed = 0
    for _ in range(kills):
        args = _recipe_cmd(recipe, out, "--resume") if out.exists() else _recipe_cmd(recipe, out)
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.25, 0.75) * run_seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
        _no_false_completes(out)
    done = subprocess.run(_recipe_cmd(recipe, out, "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return killed


def _no_false_completes(out: Path) -> None:
    """Whatever is marked complete must really be complete."""
    for ckpt in (out / "checkpoints").glob("step-*"):
        if (ckpt / ".complete").exists():
            assert (ckpt / "state.json").is_file(), ckpt
    controlnet = out / "controlnet"
    if (controlnet / ".complete").exists():
        assert (controlnet / "config.json").is_file()
        assert list(controlnet.glob("*.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    recipe = root / "killme.yaml"
    recipe.write_text(RECIPE)
    out = root / "run"
    start = time.perf_counter()
    done = subprocess.run(_recipe_cmd(recipe, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return recipe, out, time.perf_counter() - start


def _check(reference, tmp_path, kills: int, seed: int) -> None:
    recipe, ref_out, run_seconds = reference
    out = tmp_path / "killed"
    killed = _kill_and_resume(recipe, out, kills, random.Random(seed), run_seconds)
    assert killed >= 1, "no kill landed before the run finished: the test proved nothing"
    comparison = compare_weights(ref_out / "controlnet", out / "controlnet")
    assert comparison["identical"], (killed, comparison)


def test_killed_twice_then_resumed_matches_an_uninterrupted_run(reference, tmp_path):
    _check(reference, tmp_path, kills=2, seed=int(time.time()))


@pytest.mark.slow
def test_killed_ten_times_then_resumed_matches_an_uninterrupted_run(reference, tmp_path):
    _check(reference, tmp_path, kills=10, seed=1234)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_a_flow_matching_run_killed_twice_then_resumed_matches_an_uninterrupted_run(tmp_path, base):
    """The same for SD3 and FLUX.1 (their own precompute cache, control latents and flow-matching draws)."""
    recipe = tmp_path / "killme.yaml"
    recipe.write_text(RECIPE.replace("base: builtin:tiny-sd", f"base: {base}"))
    out = tmp_path / "uninterrupted"
    start = time.perf_counter()
    done = subprocess.run(_recipe_cmd(recipe, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _check((recipe, out, time.perf_counter() - start), tmp_path, kills=2, seed=17)
