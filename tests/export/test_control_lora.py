"""`--format control-lora` and `--format adapter`, read back by diffusers' own loaders: the SAI
Control-LoRA path (`ControlNetModel.from_unet(unet)` + `load_lora_adapter`, which converts the keys with
`convert_sai_sd_control_lora_state_dict_to_peft`) and PEFT's `load_lora_adapter`."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import load_file

from recipe_runner.export.adapter import load_onto
from tests.export.conftest import base_unet, controlnet_inputs, max_abs_difference, outputs, run_cli

# fp16 storage of weights of magnitude ~0.1-1 (half precision keeps 11 significant bits), through the
# tiny ControlNet's few layers: measured ~1e-3 at most; 5e-3 leaves room for other CPUs.
FP16_TOLERANCE = 5e-3


def _export(run, *args):
    result = run_cli("export", run, "--format", "control-lora", *args, "--json")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    return entry


def _through_diffusers(run, path) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(base_unet(run))
    controlnet.load_lora_adapter(str(path), prefix=None)
    return controlnet


def test_a_lora_runs_control_lora_reproduces_the_merged_controlnet_and_is_much_smaller(lora_run):
    entry = _export(lora_run)
    assert entry["source"] == "adapter" and entry["rank"] == 4 and entry["relative_error"] == 0
    path = lora_run / "export" / "tiny-sd1-canny-step3-control-lora-rank4.safetensors"
    assert entry["path"] == str(path)
    state = load_file(str(path))
    assert "lora_controlnet" in state and {v.dtype for k, v in state.items() if k != "lora_controlnet"} == {
        torch.float16
    }
    assert "input_blocks.1.0.in_layers.2.up" in state and "input_blocks.1.0.in_layers.2.down" in state
    assert "zero_convs.0.0.weight" in state and "input_hint_block.0.weight" in state
    assert not any(k.startswith(("down_blocks", "control_model.")) for k in state)

    merged = ControlNetModel.from_pretrained(lora_run / "controlnet")
    inputs = controlnet_inputs(merged)
    difference = max_abs_difference(
        outputs(merged, inputs), outputs(_through_diffusers(lora_run, path), inputs)
    )
    assert difference < FP16_TOLERANCE
    full = (lora_run / "controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert path.stat().st_size < full / 2


def test_a_full_runs_control_lora_by_svd_reports_its_error_and_loads_through_diffusers(full_run):
    low = _export(full_run, "--rank", "4")
    high = _export(full_run, "--rank", "16")
    assert low["source"] == high["source"] == "svd" and high["rank"] == 16
    assert 0 < high["relative_error"] < low["relative_error"] < 1
    path = full_run / "export" / "tiny-sd1-canny-step3-control-lora-rank16.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["relative_error"].startswith(f"{high['relative_error']:.4f}"[:5])

    trained = ControlNetModel.from_pretrained(full_run / "controlnet")
    inputs = controlnet_inputs(trained)
    reference = outputs(trained, inputs)
    scale = max(x.abs().max().item() for x in reference)
    at_16 = max_abs_difference(reference, outputs(_through_diffusers(full_run, path), inputs))
    # Lower rank, larger difference; both small against the outputs' scale (figures in docs/exports.md).
    at_4 = max_abs_difference(reference, outputs(_through_diffusers(full_run, low["path"]), inputs))
    assert at_16 <= at_4 and at_16 < 0.25 * scale


def test_the_adapter_reloads_onto_a_fresh_controlnet(lora_run):
    result = run_cli("export", lora_run, "--format", "adapter")
    assert result.exit_code == 0, result.output
    folder = lora_run / "export" / "tiny-sd1-canny-step3-adapter"
    merged = ControlNetModel.from_pretrained(lora_run / "controlnet")
    fresh = load_onto(ControlNetModel.from_unet(base_unet(lora_run)), folder)
    inputs = controlnet_inputs(merged)
    assert max_abs_difference(outputs(merged, inputs), outputs(fresh, inputs)) < 1e-5


@pytest.mark.parametrize("fmt", ["adapter"])
def test_formats_a_full_run_cannot_have_exit_2(full_run, fmt):
    result = run_cli("export", full_run, "--format", fmt)
    assert result.exit_code == 2 and "train.lora" in result.output


def test_control_lora_of_a_full_run_needs_a_rank(full_run):
    result = run_cli("export", full_run, "--format", "control-lora")
    assert result.exit_code == 2 and "--rank" in result.output


def test_the_file_holds_every_weight_a_comfyui_style_loader_needs(full_run):
    """ComfyUI (comfy/controlnet.py, ControlLora.pre_run) starts from the UNet's weights, sets each full
    key of the file and adds up @ down to the factored ones. Done here on the original names, the result
    read by diffusers' single-file loader is the trained ControlNet (up to fp16): nothing is missing.
    (diffusers' own Control-LoRA path keeps the UNet's biases in factored layers; see docs/exports.md.)"""
    from recipe_runner.export.control_lora import applied
    from recipe_runner.export.keys import SINGLE_FILE_PREFIX, original_names

    entry = _export(full_run, "--rank", "128")  # above every layer's rank: exact but for fp16
    state = load_file(entry["path"])
    base = ControlNetModel.from_unet(base_unet(full_run)).state_dict()
    names = original_names(list(base), 2)
    rebuilt = applied(state, {names[k]: v for k, v in base.items()})
    path = full_run / "export" / "rebuilt.safetensors"
    from safetensors.torch import save_file

    save_file({SINGLE_FILE_PREFIX + k: v.contiguous() for k, v in rebuilt.items()}, str(path))
    loaded = ControlNetModel.from_single_file(
        str(path), config=str(full_run / "controlnet"), local_files_only=True
    )
    path.unlink()
    trained = ControlNetModel.from_pretrained(full_run / "controlnet")
    inputs = controlnet_inputs(trained)
    assert max_abs_difference(outputs(trained, inputs), outputs(loaded, inputs)) < FP16_TOLERANCE
