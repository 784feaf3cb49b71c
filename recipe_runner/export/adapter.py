"""`adapter`: a `train.lora` run's PEFT adapter on its own, and reading it back.

The training stage leaves it in `RUN/adapter/` (training/lora.py's save_adapter): diffusers'
`pytorch_lora_weights.safetensors` (`save_lora_adapter`, its LoraConfig in the metadata) and the
ControlNet's own modules, which train in full and are no part of a LoRA. To use it:

    controlnet = ControlNetModel.from_unet(unet)
    controlnet.load_state_dict(load_file(".../controlnet_additions.safetensors"), strict=False)
    controlnet.load_lora_adapter(".../adapter-folder", prefix=None)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from recipe_runner.errors import UserError
from recipe_runner.runfolder.atomic import atomic_dir
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.training.lora import ADAPTER_FILE, ADDITIONS_FILE


def require_adapter(folder: RunFolder, fmt: str) -> Path:
    """The run's adapter folder, or a UserError that says why there is none."""
    if not (folder.adapter / ADAPTER_FILE).is_file():
        raise UserError(
            f"--format {fmt} from a LoRA's adapter: {folder.root} has no adapter/{ADAPTER_FILE}",
            hint="only a train.lora run made with this version leaves one; rerun it (`recipe run` with "
            "the same recipe), or export a fully trained run with `--format control-lora --rank N`",
        )
    return folder.adapter


def read_adapter(folder: RunFolder) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the PEFT adapter's tensors, the ControlNet's own modules) of a LoRA run."""
    from safetensors.torch import load_file

    root = require_adapter(folder, "adapter")
    return load_file(str(root / ADAPTER_FILE)), load_file(str(root / ADDITIONS_FILE))


def copy_adapter(folder: RunFolder, target: Path) -> Path:
    """The adapter folder under `target`, written whole or not at all."""
    source = require_adapter(folder, "adapter")
    with atomic_dir(target, marker=None) as tmp:
        for name in (ADAPTER_FILE, ADDITIONS_FILE):
            shutil.copyfile(source / name, tmp / name)
    return target


def load_onto(controlnet, adapter_folder: Path):
    """`controlnet` (fresh, from the base UNet) with the adapter folder's modules and LoRA loaded."""
    from safetensors.torch import load_file

    additions = load_file(str(adapter_folder / ADDITIONS_FILE))
    missing = set(additions) - set(controlnet.state_dict())
    if missing:
        raise UserError(f"{adapter_folder}: the ControlNet has no {sorted(missing)[0]} (another base?)")
    controlnet.load_state_dict(additions, strict=False)
    controlnet.load_lora_adapter(str(adapter_folder), weight_name=ADAPTER_FILE, prefix=None)
    return controlnet
