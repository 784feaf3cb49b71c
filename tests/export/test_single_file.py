"""`recipe export --format single-file`: the original ControlNet layout, read back by diffusers'
single-file loader (which nobody here wrote), equals the trained weights."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file

from tests.export.conftest import run_cli, train


def _only(folder, pattern):
    (found,) = sorted(folder.glob(pattern))
    return found


def test_single_file_loads_with_from_single_file_and_equals_the_trained_weights(full_run):
    result = run_cli("export", full_run, "--format", "single-file", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    path = _only(full_run / "export", "*-single-file-fp32.safetensors")
    assert path.name == "tiny-sd1-canny-step3-single-file-fp32.safetensors"
    keys = load_file(str(path))
    # The layout AUTOMATIC1111 and ComfyUI detect (scripts/controlnet_model_guess.py, comfy/controlnet.py).
    assert "control_model.input_hint_block.0.weight" in keys and "control_model.zero_convs.0.0.weight" in keys
    assert "control_model.middle_block_out.0.weight" in keys
    assert "control_model.input_blocks.1.0.in_layers.2.weight" in keys
    assert not any(k.startswith(("control_model.down_blocks", "down_blocks")) for k in keys)

    trained = ControlNetModel.from_pretrained(full_run / "controlnet")
    loaded = ControlNetModel.from_single_file(
        str(path), config=str(full_run / "controlnet"), local_files_only=True
    )
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()


def test_fp16_single_file_and_diffusers_folder_hold_the_weights_in_half_precision(full_run):
    result = run_cli("export", full_run, "--format", "single-file", "--format", "diffusers")
    assert result.exit_code == 0, result.output
    path = _only(full_run / "export", "*-single-file-fp16.safetensors")
    folder = _only(full_run / "export", "*-diffusers-fp16")
    trained = ControlNetModel.from_pretrained(full_run / "controlnet").state_dict()
    single = ControlNetModel.from_single_file(
        str(path), config=str(full_run / "controlnet"), local_files_only=True, torch_dtype=torch.float16
    ).state_dict()
    stored = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert not list(folder.glob("*.bin"))
    half = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float16)
    for k, v in half.state_dict().items():
        assert torch.equal(v, trained[k].half()) and torch.equal(single[k], trained[k].half())
    assert (
        path.stat().st_size < (full_run / "controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_sdxl_single_file_carries_label_emb_and_converts_back_equal(tmp_path):
    """SDXL's added time/text embedding is stored as `label_emb`, the key ComfyUI's model detection and
    sd-webui-controlnet's controlnet_model_guess.py read to tell an SDXL ControlNet.

    diffusers' `convert_controlnet_checkpoint` (0.42) maps every other key but never reads `label_emb`, so
    `from_single_file` leaves `add_embedding` on the meta device for any SDXL ControlNet in this layout;
    the test converts with diffusers' function and takes `label_emb` through diffusers' own mapping table.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    run = train(tmp_path, "model.base=builtin:tiny-sdxl", "train.max_steps=1")
    result = run_cli("export", run, "--format", "single-file", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    path = _only(run / "export", "*-single-file-fp32.safetensors")
    assert path.name == "tiny-sdxl-canny-step1-single-file-fp32.safetensors"
    assert "diffusers' from_single_file cannot read an SDXL ControlNet" in result.output
    stored = load_file(str(path))
    assert "control_model.label_emb.0.0.weight" in stored and "control_model.label_emb.0.2.bias" in stored

    model = ControlNetModel.from_pretrained(run / "controlnet")
    converted = convert_controlnet_checkpoint(stored, dict(model.config))
    for ours, ldm in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        converted[ours] = stored["control_model." + ldm]
    trained = model.state_dict()
    assert trained.keys() == converted.keys()
    assert all(torch.equal(trained[k], converted[k]) for k in trained)


def test_the_demo_bases_exports_load_in_diffusers_and_say_which_tools_cannot_read_them(tmp_path):
    """builtin:shapes-sd (the demo's base) has 1 layer per block and a VAE that shrinks 4x, so a
    3-stage conditioning embedding: its single file still loads with from_single_file (the embedding's
    last convolution where diffusers' converter reads it), and each export says which readers refuse it."""
    run = train(tmp_path, "model.base=builtin:shapes-sd", "train.max_steps=1")
    result = run_cli("export", run, "--format", "single-file", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "ComfyUI and AUTOMATIC1111 build a fixed conditioning embedding of 4 stages" in result.output
    path = _only(run / "export", "*-single-file-fp32.safetensors")
    assert "control_model.input_hint_block.14.weight" in load_file(str(path))
    trained = ControlNetModel.from_pretrained(run / "controlnet").state_dict()
    loaded = ControlNetModel.from_single_file(
        str(path), config=str(run / "controlnet"), local_files_only=True
    ).state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)

    result = run_cli("export", run, "--format", "control-lora", "--rank", "8")
    assert result.exit_code == 0, result.output
    assert "reads Control-LoRAs of 2 layers per block only; this base has 1" in result.output


@pytest.mark.parametrize(
    ("base", "cls"), [("tiny-sd3", "SD3ControlNetModel"), ("tiny-flux", "FluxControlNetModel")]
)
def test_the_diffusers_export_of_a_flow_matching_run_loads_with_its_familys_class(tmp_path, base, cls):
    """`--format diffusers` read an SD3 or FLUX.1 ControlNet as an SD ControlNetModel, whose weights
    stayed on the meta device ("Cannot copy out of meta tensor", a traceback)."""
    import diffusers

    folder = train(tmp_path, f"model.base=builtin:{base}", "train.max_steps=1")
    result = run_cli("export", folder, "--format", "diffusers", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    (exported,) = (folder / "export").iterdir()
    model_cls = getattr(diffusers, cls)
    half = model_cls.from_pretrained(exported, torch_dtype=torch.bfloat16)
    trained = model_cls.from_pretrained(folder / "controlnet")
    stored = load_file(_only(exported, "*.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    for key, value in trained.state_dict().items():
        assert torch.equal(half.state_dict()[key], value.to(torch.bfloat16)), key
