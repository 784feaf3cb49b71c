"""`train.lora`: a LoRA of the ControlNet, through PEFT as diffusers' models carry it (`add_adapter`).

The copy of the UNet's encoder stays frozen, stored in the compute precision; PEFT's LoRA layers wrap its
attention, feed-forward and convolution layers; the conditioning embedding and the zero convolutions,
which a ControlNet adds and which start from nothing, train in full (as in Stability's Control-LoRA).
Saving merges the adapter into a plain ControlNet, so `controlnet/` loads with
`ControlNetModel.from_pretrained` like a fully trained one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from diffusers import ControlNetModel

from recipe_runner.errors import UserError
from recipe_runner.recipe.train import LoraSpec

# Layer names PEFT matches by suffix: every attention projection, transformer feed-forward and resnet
# convolution of the copied encoder (diffusers' names; the same in SD 1.x, 2.x and SDXL ControlNets).
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
# What a ControlNet adds to the copied encoder: no pretrained weights to adapt, so trained in full.
TRAINED_IN_FULL = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise UserError(
            "train.lora needs PEFT, which is not installed",
            hint="pip install 'recipe-runner[lora]', or set train.lora: null to train every weight",
        )


def add_lora(controlnet: ControlNetModel, spec: LoraSpec, frozen_dtype: torch.dtype) -> ControlNetModel:
    """Freeze `controlnet` in `frozen_dtype`, add the LoRA layers, and make them and the ControlNet's own
    additions trainable in fp32 (the master weights, as a fully trained ControlNet's are)."""
    require_peft()
    from peft import LoraConfig

    controlnet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha or spec.rank, lora_dropout=spec.dropout, target_modules=TARGETS
    )
    controlnet.add_adapter(config)  # LoRA's B matrices start at zero: the ControlNet is unchanged
    for name, param in controlnet.named_parameters():
        trained = "lora_" in name or name.startswith(TRAINED_IN_FULL)
        param.requires_grad_(trained)
        param.data = param.data.float() if trained else param.data.to(frozen_dtype)
    return controlnet


def is_lora(controlnet: torch.nn.Module) -> bool:
    return bool(getattr(controlnet, "_hf_peft_config_loaded", False))


def plain_copy(controlnet: ControlNetModel) -> ControlNetModel:
    """A plain fp32 ControlNet on the CPU with `controlnet`'s weights, a LoRA's merged in (for saving a
    LoRA, and for the CPU validation copy); `controlnet` itself is left as it is. Rebuilt from the config
    rather than deep-copied: a prepared model's forward is wrapped by accelerate (fp32 outputs), and a
    copy of one on a GPU would take the GPU's memory."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in controlnet.state_dict().items()}
    plain = type(controlnet).from_config(controlnet.config)  # the family's ControlNet class
    lora = is_lora(controlnet)
    if lora:
        plain.add_adapter(controlnet.peft_config["default"])
    plain.load_state_dict(state)
    if lora:
        plain.fuse_lora()
        plain.unload_lora()
    return plain


ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name (load_lora_adapter's default)
ADDITIONS_FILE = "controlnet_additions.safetensors"


def save_adapter(controlnet: ControlNetModel, folder: Path) -> None:
    """The PEFT adapter (`save_lora_adapter`, with its LoraConfig in the file's metadata) and, beside it,
    the modules a ControlNet adds to the UNet copy, which train in full and are no part of an adapter:
    `ControlNetModel.from_unet(unet)`, those loaded, then `load_lora_adapter(folder)` is the ControlNet."""
    from safetensors.torch import save_file

    controlnet.save_lora_adapter(folder, adapter_name="default", weight_name=ADAPTER_FILE)
    additions = {
        name: param.detach().to("cpu", torch.float32).contiguous()
        for name, param in controlnet.named_parameters()
        if name.startswith(TRAINED_IN_FULL)
    }
    save_file(additions, str(folder / ADDITIONS_FILE))


def trainable(controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in controlnet.parameters() if p.requires_grad]
