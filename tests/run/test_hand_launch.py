"""A run the user starts with `accelerate launch` is one run, or stops before writing anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

RECIPE = (
    "name: acc\ndataset: {source: {builtin: shapes, num_samples: 24}, resolution: 64}\n"
    "model: {base: 'builtin:tiny-sd'}\n"
    "train: {max_steps: 2, batch_size: 2, validation: {every: 2, num_images: 1, num_rows: 1, "
    "num_inference_steps: 1}}\nlogging: {tracker: none}\n"
)


def test_one_process_where_several_were_asked_is_refused(cli, tmp_path, monkeypatch):
    """What accelerate's simple launcher leaves (`accelerate launch --num_processes 2` without --multi_gpu):
    one process, MASTER_ADDR set for the processes it did not start."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = cli("train", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "accelerate launch --multi_gpu --num_processes N -m recipe_runner train" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["FSDP", "DEEPSPEED"])
def test_a_launch_that_asks_for_sharding_is_refused(cli, tmp_path, monkeypatch, strategy):
    """`accelerate launch --use_fsdp ...` (or a config file with distributed_type: FSDP) sets
    ACCELERATE_USE_FSDP in every process: refused before anything is written, not trained untested."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    monkeypatch.setenv(f"ACCELERATE_USE_{strategy}", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = cli("train", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert f"asked for {strategy}" in r.stderr and "DDP only" in r.stderr
    assert "accelerate launch --multi_gpu --num_processes N -m recipe_runner train" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_launched_cpu_processes_form_one_run_without_being_told_to_use_the_cpu(tmp_path):
    """Without ACCELERATE_USE_CPU, accelerate gives each of the processes a world of its own: they would
    train two runs into one folder. recipe-runner tells accelerate to use gloo, as launch.num_processes does."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["-m", "recipe_runner", "train", str(recipe), "-o", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "2 process(es)" in log and "1 process(es)" not in log


def test_train_threads_is_set_before_torch_starts_its_threads(tmp_path):
    """train.threads reaches OpenMP through OMP_NUM_THREADS before torch loads (torch.set_num_threads later
    leaves threads already started spinning: benchmarks/contention.py, `one` against `one-env`)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("max_steps: 2", "max_steps: 1, threads: 1"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "recipe_runner", "train", str(recipe), "-o", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on cpu (1 thread each)" in (tmp_path / "out" / "log.txt").read_text()


def test_threads_sleep_when_the_machine_is_busy_as_a_run_starts(monkeypatch, tmp_path):
    """OMP_WAIT_POLICY: PASSIVE beside other work, untouched on an idle machine or when the user set it."""
    from recipe_runner.cli import process, stages
    from recipe_runner.recipe.loader import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    loaded = load_recipe(recipe)
    monkeypatch.setattr(stages, "sys", type("S", (), {"modules": {}})())  # as if torch were not loaded yet
    for busy, given, expected in [(80.0, None, "PASSIVE"), (3.0, None, None), (80.0, "ACTIVE", "ACTIVE")]:
        monkeypatch.setattr(process, "others_cpu_percent", lambda busy=busy: busy)
        if given is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", given)
        stages._threads_for(loaded)
        assert os.environ.get("OMP_WAIT_POLICY") == expected, (busy, given)
