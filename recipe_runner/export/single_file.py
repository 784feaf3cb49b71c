"""`single-file`: one .safetensors in the original ControlNet layout (`control_model.input_blocks...`).

This is the file AUTOMATIC1111's sd-webui-controlnet and ComfyUI load from their `models/ControlNet`
folders, and what diffusers' `ControlNetModel.from_single_file` reads (see keys.py for the sources).
"""

from __future__ import annotations

import torch

from recipe_runner.export.keys import SINGLE_FILE_PREFIX, original_names


def single_file_state(controlnet_state: dict[str, torch.Tensor], layers_per_block: int, dtype: torch.dtype):
    """The ControlNet's state dict under the original names, in `dtype`."""
    names = original_names(list(controlnet_state), layers_per_block)
    return {
        SINGLE_FILE_PREFIX + names[k]: v.detach().to("cpu", dtype).contiguous()
        for k, v in controlnet_state.items()
    }
