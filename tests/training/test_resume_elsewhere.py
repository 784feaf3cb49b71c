"""Resuming with another process count at the same rows per micro-step (1 x 4 as 2 x 2, or back)."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from recipe_runner.errors import UserError
from recipe_runner.training import train_controlnet
from recipe_runner.training.checkpoints import realign_schedule
from recipe_runner.training.keys import changed_fields, comparable

SCHEDULE = ("train.lr_scheduler=cosine", "train.lr_warmup_steps=1", "train.checkpoint_every=10")


def test_processes_and_batch_compare_as_their_product():
    one = {"launch.num_processes": 1, "train.batch_size": 4, "seed": 0}
    assert not changed_fields(
        comparable(one), comparable({**one, "launch.num_processes": 2, "train.batch_size": 2})
    )
    assert changed_fields(comparable(one), comparable({**one, "train.batch_size": 2})) == [
        "train.batch_size × processes: 4 -> 2"
    ]


def test_the_schedule_is_realigned_to_the_new_process_count():
    """A checkpoint of 1 process at step 3 holds the clock 3; with 2 processes the same step is 6 on a
    schedule twice as long: realigned, the learning rate is the one the uninterrupted run has there."""

    def schedule(processes: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, get_scheduler(
            "cosine", optimizer, num_warmup_steps=2 * processes, num_training_steps=10 * processes
        )

    opt1, one = schedule(1)
    for _ in range(3):
        opt1.step()
        one.step()
    opt2, two = schedule(2)
    two.load_state_dict(one.state_dict())  # what load_state gives: the 1-process clock
    realign_schedule(two, opt2, 3 * 2)
    assert (
        opt2.param_groups[0]["lr"] == pytest.approx(opt1.param_groups[0]["lr"])
        and two.get_last_lr() == one.get_last_lr()
    )
    for _ in range(2):  # and it goes on in step: two scheduler steps a step with 2 processes
        opt1.step()
        one.step()
        for _ in range(2):
            opt2.step()
            two.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt1.param_groups[0]["lr"])


def test_another_number_of_rows_per_micro_step_is_refused(make_run):
    loaded, folder = make_run("train.max_steps=2", "train.batch_size=4", *SCHEDULE, name="run")
    train_controlnet(loaded, folder)
    loaded, _ = make_run("train.max_steps=4", "train.batch_size=2", *SCHEDULE, name="run")
    with pytest.raises(UserError, match=r"train\.batch_size × processes: 4 -> 2"):
        train_controlnet(loaded, folder, resume=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_one_process_checkpoint_resumes_on_two_as_if_uninterrupted(make_run, capsys):
    loaded, straight = make_run("train.max_steps=4", "train.batch_size=4", *SCHEDULE, name="straight")
    expected = train_controlnet(loaded, straight)

    loaded, moved = make_run("train.max_steps=2", "train.batch_size=4", *SCHEDULE, name="moved")
    train_controlnet(loaded, moved)
    loaded, _ = make_run(
        "train.max_steps=4", "train.batch_size=2", "launch.num_processes=2", *SCHEDULE, name="moved"
    )
    resumed = train_controlnet(loaded, moved, resume=True)
    assert resumed["resumed_from"] == 2 and resumed["processes"] == 2
    for (_, a), (_, b) in zip(expected["losses"], resumed["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    a = load_file(straight.controlnet / "diffusion_pytorch_model.safetensors")
    b = load_file(moved.controlnet / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
