"""`train.lora`: a LoRA of the ControlNet, through PEFT as diffusers' models carry it (`add_adapter`).

The copy of the denoiser (the UNet's encoder, or the transformer's first blocks) stays frozen, stored
in the compute precision; PEFT's LoRA layers wrap the layers its model family names
(`ModelFamily.lora_targets`); what a ControlNet adds to the copy and which starts from nothing (the
conditioning embedding, the zero convolutions or zero-initialised projections) trains in full, as in
Stability's Control-LoRA. Saving merges the adapter into a plain ControlNet, so `controlnet/` loads with
the family's `from_pretrained` like a fully trained one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from recipe_runner.errors import UserError
from recipe_runner.families import FAMILIES, ModelFamily
from recipe_runner.recipe.train import LoraSpec


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise UserError(
            "train.lora needs PEFT, which is not installed",
            hint="pip install 'recipe-runner[lora]', or set train.lora: null to train every weight",
        )


def family_of_controlnet(controlnet: torch.nn.Module) -> ModelFamily:
    """The model family whose ControlNet class `controlnet` is (SD 1.x/2.x/XL share theirs, and their
    LoRA layers)."""
    for family in FAMILIES.values():
        if isinstance(controlnet, family.controlnet_class()):
            return family
    raise TypeError(f"no model family trains a {type(controlnet).__name__}")


def add_lora(controlnet: torch.nn.Module, spec: LoraSpec, frozen_dtype: torch.dtype) -> torch.nn.Module:
    """Freeze `controlnet` in `frozen_dtype`, add the LoRA layers, and make them and the ControlNet's own
    additions trainable in fp32 (the master weights, as a fully trained ControlNet's are)."""
    require_peft()
    from peft import LoraConfig

    family = family_of_controlnet(controlnet)
    controlnet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha or spec.rank,
        lora_dropout=spec.dropout,
        target_modules=list(family.lora_targets),
    )
    controlnet.add_adapter(config)  # LoRA's B matrices start at zero: the ControlNet is unchanged
    for name, param in controlnet.named_parameters():
        trained = "lora_" in name or name.startswith(family.lora_trained_in_full)
        param.requires_grad_(trained)
        param.data = param.data.float() if trained else param.data.to(frozen_dtype)
    return controlnet


def is_lora(controlnet: torch.nn.Module) -> bool:
    return bool(getattr(controlnet, "_hf_peft_config_loaded", False))


def plain_copy(controlnet: torch.nn.Module) -> torch.nn.Module:
    """A plain fp32 ControlNet on the CPU with `controlnet`'s weights, a LoRA's merged in (for saving a
    LoRA, and for the CPU validation copy); `controlnet` itself is left as it is. Rebuilt from the config
    rather than deep-copied: a prepared model's forward is wrapped by accelerate (fp32 outputs), and a
    copy of one on a GPU would take the GPU's memory."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in controlnet.state_dict().items()}
    plain = type(controlnet).from_config(controlnet.config)  # the family's ControlNet class
    lora = is_lora(controlnet)
    if lora:
        name = next(iter(controlnet.peft_config))  # "default" when trained, else load_lora_adapter's
        plain.add_adapter(controlnet.peft_config[name], adapter_name=name)
    plain.load_state_dict(state)
    if lora:
        plain.fuse_lora()
        plain.unload_lora()
    return plain


ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name (load_lora_adapter's default)
ADDITIONS_FILE = "controlnet_additions.safetensors"


def save_adapter(controlnet: torch.nn.Module, folder: Path) -> None:
    """The PEFT adapter (`save_lora_adapter`, with its LoraConfig in the file's metadata) and, beside it,
    the modules a ControlNet adds to the denoiser's copy, which train in full and are no part of an
    adapter: a new ControlNet from the base (`ControlNetModel.from_unet`, `SD3ControlNetModel` /
    `FluxControlNetModel.from_transformer`), those loaded, then `load_lora_adapter(folder)`."""
    from safetensors.torch import save_file

    controlnet.save_lora_adapter(folder, adapter_name="default", weight_name=ADAPTER_FILE)
    additions = {
        name: param.detach().to("cpu", torch.float32).contiguous()
        for name, param in controlnet.named_parameters()
        if name.startswith(family_of_controlnet(controlnet).lora_trained_in_full)
    }
    save_file(additions, str(folder / ADDITIONS_FILE))


def trainable(controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in controlnet.parameters() if p.requires_grad]
