"""SIGTERM to a real `recipe run`: the step finishes, a checkpoint is written, exit 130 says how to resume."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

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


@contextlib.contextmanager
def _run_in_own_group(recipe: Path, out: Path, **popen) -> Iterator[subprocess.Popen]:
    """`recipe run` as a shell runs a foreground job (a process group of its own); whatever of it is
    left when the test ends, pass or fail, is killed, so that a failure leaves no training behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "recipe_runner", "run", str(recipe), "-o", str(out)]
    proc = subprocess.Popen(args, env=env, text=True, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        for child in _descendants(proc):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _checkpointed(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait for a first checkpoint: the workers are training (their progress goes to their stdout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "checkpoints").glob("step-*/.complete")):
            return
        time.sleep(0.5)
    raise AssertionError("training did not start")


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_several_processes_stop_quietly_with_a_checkpoint(write_recipe, tmp_path, how):
    """A terminal's Ctrl-C signals the whole foreground group; torch's launcher then printed its own
    traceback. Now only our one message is printed, and every process is gone."""
    recipe = write_recipe(
        # Two checkpoints kept: the disk check counts every one a run may write (5000 here, 61 GB).
        RECIPE.replace("checkpoint_every: 100000", "checkpoint_every: 20\n  checkpoints_total_limit: 2")
        + "launch: {num_processes: 2}\n"
    )
    out = tmp_path / "run"
    with _run_in_own_group(recipe, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        _checkpointed(out, proc)
        processes = _descendants(proc)
        assert len(processes) >= 3  # the launcher and two training processes
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err, err
        assert "plus --resume" in err
        written = re.search(r"checkpoint written to (\S+)\.", err)
        assert written and (Path(written.group(1)) / ".complete").is_file(), err
        assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.multiprocess
def test_ctrl_c_while_the_processes_start_says_nothing_was_saved(write_recipe, tmp_path):
    recipe = write_recipe(RECIPE + "launch: {num_processes: 2}\n")
    out = tmp_path / "run"
    with _run_in_own_group(recipe, out, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "train-launch.json").is_file():
            time.sleep(0.2)
        time.sleep(1)  # the launcher is starting the training processes, which import torch
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        assert "stopped before training began" in err or "plus --resume" in err


def test_under_accelerate_launch_only_rank_0_says_it_stopped(monkeypatch, capsys):
    """Every rank of a hand-launched run stops with the same message; printing it once is enough."""
    from recipe_runner.cli.output import handles_errors
    from recipe_runner.errors import Interrupted

    @handles_errors
    def stopped() -> None:
        raise Interrupted("training stopped at step 3")

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("1", ""), ("0", "training stopped at step 3")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            stopped()
        assert exit_.value.code == 130
        assert capsys.readouterr().err.strip() == expected
