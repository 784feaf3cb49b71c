"""train.ema_decay: the averaged ControlNet in controlnet/ and the grids, resumable, and its memory."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from recipe_runner.training import train_controlnet
from recipe_runner.training.ema import ControlNetEMA, averaged

EMA = ("train.ema_decay=0.9", "train.checkpoint_every=10")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    net.config = {}  # EMAModel keeps a model config for from_pretrained; none needed here
    return net


@pytest.mark.parametrize("offload", [False, True])
def test_the_update_is_diffusers_emamodel_step(offload):
    """Our in-place lerp gives diffusers' EMAModel's average (its warm-up schedule included), offloaded
    between steps or not."""
    net = _net()
    ours = ControlNetEMA(net, 0.95, offload)
    theirs = EMAModel(net.parameters(), decay=0.95)
    for step in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1 + step)
        ours.step(net.parameters())
        theirs.step(net.parameters())
    assert ours.cur_decay_value == theirs.cur_decay_value
    assert all(s.device.type == "cpu" for s in ours.shadow_params)
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_averaged_swaps_the_average_in_and_the_trained_weights_back():
    net = _net()
    ema = ControlNetEMA(net, 0.5, False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.step(net.parameters())  # first step: decay 0, the average is the weights
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    trained = copy.deepcopy(net.state_dict())
    with averaged(ema, net):
        assert all(torch.equal(p, s) for p, s in zip(net.parameters(), ema.shadow_params, strict=True))
        assert not torch.equal(net[0].weight, trained["0.weight"])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())


def test_the_run_saves_the_average_and_resumes_it_bit_identically(make_run, straight_and_resumed):
    straight, _ = straight_and_resumed(*EMA)
    saved = load_file(straight.controlnet / "diffusion_pytorch_model.safetensors")
    raw = load_file(straight.checkpoints / "step-4" / "model.safetensors")
    assert saved.keys() == raw.keys() and any(not torch.equal(saved[k], raw[k]) for k in saved)
    assert "exponential moving average of the trained ones (decay 0.9)" in straight.model_card.read_text()

    loaded, plain = make_run("train.max_steps=4", "train.checkpoint_every=10", name="plain")
    train_controlnet(loaded, plain)
    # The trained weights are those of a run without the average: it only watches.
    plain_raw = load_file(plain.checkpoints / "step-4" / "model.safetensors")
    assert all(torch.equal(raw[k], v) for k, v in plain_raw.items())


def test_offloading_the_average_changes_nothing_but_where_it_waits(make_run):
    loaded, a = make_run(*EMA, "train.max_steps=3", name="resident")
    train_controlnet(loaded, a)
    loaded, b = make_run(*EMA, "train.max_steps=3", "train.ema_offload=true", name="offloaded")
    train_controlnet(loaded, b)
    wa = load_file(a.controlnet / "diffusion_pytorch_model.safetensors")
    wb = load_file(b.controlnet / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ema_memory_in_the_estimate_and_the_trace(cli, plan_recipe, tmp_path):
    import json

    recipe = plan_recipe

    def plan(*sets: str) -> dict:
        args = [a for s in sets for a in ("--set", s)]
        result = cli("plan", recipe, "-o", tmp_path / "run", "--trace", "--json", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["memory"]

    plain, ema = plan(), plan("train.ema_decay=0.999")
    offloaded = plan("train.ema_decay=0.999", "train.ema_offload=true")
    fp32_controlnet = ema["traced"]["controlnet_weights_gb"]
    assert ema["traced"]["ema_gb"] == pytest.approx(fp32_controlnet) and offloaded["traced"]["ema_gb"] == 0
    assert ema["traced"]["peak_gb"] == pytest.approx(plain["traced"]["peak_gb"] + fp32_controlnet, abs=1e-3)

    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.estimates import estimate_memory

    def estimate(*sets: str) -> float:
        return estimate_memory(load_recipe(recipe, list(sets)).recipe).controlnet_training_gb

    grew = estimate("train.ema_decay=0.999") - estimate()
    assert grew == pytest.approx(fp32_controlnet, rel=0.05)
    assert estimate("train.ema_decay=0.999", "train.ema_offload=true") == estimate()


def test_ema_offload_without_an_average_is_refused(cli, write_recipe):
    path = write_recipe(
        """\
        name: t
        dataset: {source: {builtin: shapes}, resolution: 64}
        model: {base: builtin:tiny-sd}
        train:
          ema_offload: true
        """
    )
    result = cli("validate", path)
    assert (
        result.exit_code == 2
        and "set train.ema_decay" in result.output
        and f"{path.name}:5:" in result.output
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_keep_the_same_average_and_resume_it(make_run):
    loaded, one = make_run(*EMA, "train.max_steps=3", "train.batch_size=4", name="one")
    train_controlnet(loaded, one)
    settings = (*EMA, "train.batch_size=2", "launch.num_processes=2")
    loaded, two = make_run(*settings, "train.max_steps=2", name="two")
    train_controlnet(loaded, two)
    loaded, _ = make_run(*settings, "train.max_steps=3", name="two")
    assert train_controlnet(loaded, two, resume=True)["resumed_from"] == 2
    a = load_file(one.controlnet / "diffusion_pytorch_model.safetensors")
    b = load_file(two.controlnet / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
