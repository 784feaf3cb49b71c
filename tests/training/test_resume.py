"""Checkpoints and --resume: a resumed run ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.errors import Interrupted, UserError
from recipe_runner.training import train_controlnet
from recipe_runner.training.progress import TrainingProgress


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder.controlnet / "diffusion_pytorch_model.safetensors")


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send ourselves SIGINT when the progress bar reaches `step`, as Ctrl-C would."""
    update = TrainingProgress.update

    def update_then_signal(self, current: int, loss, lr) -> None:
        update(self, current, loss, lr)
        if current == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainingProgress, "update", update_then_signal)


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_to_train_longer_is_bit_identical(make_run):
    """A finished run always ends with a checkpoint; resuming it with a higher max_steps continues
    exactly where an uninterrupted longer run would be."""
    loaded, straight = make_run("train.max_steps=4", name="straight")
    train_controlnet(loaded, straight)
    loaded, short = make_run("train.max_steps=2", "train.checkpoint_every=10", name="short")
    train_controlnet(loaded, short)
    assert [p.name for p in short.checkpoints.iterdir()] == ["step-2"]
    loaded, _ = make_run("train.max_steps=4", "train.checkpoint_every=10", name="short")
    results = train_controlnet(loaded, short, resume=True)
    assert results["resumed_from"] == 2 and results["steps"] == 4 and results["steps_this_run"] == 2
    assert _same_weights(straight, short)


def test_interrupt_then_resume_with_accumulation_is_bit_identical(make_run, monkeypatch: pytest.MonkeyPatch):
    settings = ("train.max_steps=3", "train.gradient_accumulation_steps=2", "train.checkpoint_every=10")
    loaded, straight = make_run(*settings, name="straight")
    train_controlnet(loaded, straight)

    loaded, stopped = make_run(*settings, name="stopped")
    # Whatever handler was there before (SIG_IGN when started in the background) must be restored.
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 1)
        with pytest.raises(Interrupted) as info:
            train_controlnet(loaded, stopped)
    # The signal arrives after step 1; the loop sees it at the end of step 2 and checkpoints there.
    assert "step 2" in str(info.value) and "--resume" in str(info.value)
    assert [p.name for p in stopped.checkpoints.iterdir()] == ["step-2"]
    state = json.loads((stopped.checkpoints / "step-2" / "state.json").read_text())
    assert state["global_step"] == 2 and state["micro_step"] == 4  # optimizer steps x accumulation
    assert not stopped.controlnet.exists()
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored

    results = train_controlnet(loaded, stopped, resume=True)
    assert results["resumed_from"] == 2 and results["steps"] == 3 and results["steps_this_run"] == 1
    assert _same_weights(straight, stopped)


def test_resume_skips_a_damaged_newest_checkpoint(make_run, capsys):
    from rich.console import Console

    loaded, folder = make_run("train.max_steps=2", "train.checkpoint_every=1")
    train_controlnet(loaded, folder)
    (folder.checkpoints / "step-2" / "optimizer.bin").write_bytes(b"not a checkpoint")
    (folder.checkpoints / "step-3").mkdir()  # a folder without the completion marker
    console = Console(force_terminal=False, width=200)
    loaded, _ = make_run("train.max_steps=3", "train.checkpoint_every=1")
    results = train_controlnet(loaded, folder, resume=True, console=console)
    out = capsys.readouterr().out
    assert "step-3 is incomplete" in out and "step-2 could not be loaded" in out
    assert "resuming from checkpoint step-1" in out
    assert results["resumed_from"] == 1 and results["steps"] == 3


def test_resume_with_a_changed_recipe_is_a_user_error(make_run):
    loaded, folder = make_run("train.max_steps=1")
    train_controlnet(loaded, folder)
    controlnet_before = (folder.controlnet / "diffusion_pytorch_model.safetensors").read_bytes()
    loaded, _ = make_run("train.max_steps=2", "train.learning_rate=3e-4")
    with pytest.raises(UserError) as info:
        train_controlnet(loaded, folder, resume=True)
    assert "train.learning_rate: 0.0001 -> 0.0003" in info.value.message
    assert "without --resume" in info.value.hint
    assert (folder.controlnet / "diffusion_pytorch_model.safetensors").read_bytes() == controlnet_before
    # As the hint says: without --resume the new recipe starts over, replacing the old run's checkpoints.
    shutil.copytree(folder.checkpoints / "step-1", folder.checkpoints / "step-7")
    results = train_controlnet(loaded, folder)
    assert results["resumed_from"] is None
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["step-2"]


def test_adamw_8bit_trains_and_resumes_bit_identically_on_the_cpu(make_run, monkeypatch):
    """bitsandbytes' 8-bit AdamW (the low-VRAM preset's) runs on the CPU: its quantised state goes into
    the checkpoint and comes back, so a resumed run ends where an uninterrupted one does."""
    pytest.importorskip("bitsandbytes")
    settings = ("train.max_steps=3", "train.optimizer=adamw_8bit", "train.checkpoint_every=10")
    loaded, straight = make_run(*settings, name="straight")
    train_controlnet(loaded, straight)
    loaded, stopped = make_run(*settings, name="stopped")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 1)
        with pytest.raises(Interrupted):
            train_controlnet(loaded, stopped)
    results = train_controlnet(loaded, stopped, resume=True)
    assert results["resumed_from"] == 2 and results["steps"] == 3  # the loop checkpoints at step 2
    assert _same_weights(straight, stopped)
    # The 8-bit update is not the fp32 one: the same run with torch's AdamW ends elsewhere.
    loaded, fp32 = make_run("train.max_steps=3", "train.checkpoint_every=10", name="fp32")
    train_controlnet(loaded, fp32)
    assert not _same_weights(straight, fp32)


def test_a_resumed_run_reports_its_own_time(make_run, capsys):
    loaded, folder = make_run("train.max_steps=2", "train.checkpoint_every=10", name="first")
    first = train_controlnet(loaded, folder)
    loaded, _ = make_run("train.max_steps=3", "train.checkpoint_every=10", name="first")
    results = train_controlnet(loaded, folder, resume=True)
    assert (
        results["seconds_this_run"] <= results["wall_seconds"] < results["seconds"] + results["wall_seconds"]
    )
    assert results["seconds"] == pytest.approx(first["seconds"] + results["seconds_this_run"], abs=1e-2)
    assert results["steps_per_second"] * results["seconds_this_run"] == pytest.approx(1, rel=0.5)
