"""diffusers' ControlNet key names ↔ the original (ldm `cldm.ControlNet`) ones, for SD 1.x, 2.x and SDXL.

The original layout is what lllyasviel's ControlNet trained and what the tools that run ControlNets read:
ComfyUI (`comfy/controlnet.py`, `load_controlnet_state_dict`: the `control_model.` prefix and
`zero_convs.N.0`, `input_hint_block.N`, `middle_block_out.0`; `comfy/cldm/cldm.py` builds the module
these names belong to) and AUTOMATIC1111's sd-webui-controlnet (`scripts/controlnet_model_guess.py`,
`build_model_by_guess`: `input_hint_block.0.weight` marks a ControlNet, `label_emb.0.0.bias` an SDXL one,
`lora_controlnet` a Control-LoRA). diffusers' `convert_controlnet_checkpoint`
(loaders/single_file_utils.py) reads it the other way; the tests load our files through it.

Pure string work on names (no torch): `original_name(diffusers_name, layers_per_block)`.
"""

from __future__ import annotations

import re

SINGLE_FILE_PREFIX = "control_model."

# Inside a resnet: diffusers' names → the original ResBlock's.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_mid_block": "middle_block_out.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_DOWNSAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_ZERO = re.compile(r"^controlnet_down_blocks\.(\d+)\.(.+)$")
_HINT = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.(.+)$")
_HINT_OUT = re.compile(r"^controlnet_cond_embedding\.conv_out\.(.+)$")


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET.get(layer, layer)}.{param}"


def _hint_out_index(cond_blocks: int) -> int:
    """Where the conditioning embedding's last convolution goes. The original module (a Sequential of 8
    convolutions with SiLUs between) has it at 14, and diffusers' `convert_controlnet_checkpoint` reads
    it from 14 whatever the count. A shorter embedding (a base whose VAE shrinks 4x, as the demo's) has
    no original module, and ComfyUI's `cldm.ControlNet` refuses it by shape either way; 14 is where the
    one loader that can build it looks. Past 6 blocks 14 is taken: the Sequential's own index."""
    return max(14, 2 * (cond_blocks + 1))


def original_name(name: str, layers_per_block: int, cond_blocks: int) -> str:
    """The original key of diffusers ControlNet parameter `name` (`cond_blocks`: the conditioning
    embedding's `blocks` count, 6 for the default (16, 32, 96, 256) channels)."""
    for diffusers, original in _TOP.items():
        if name.startswith(diffusers + "."):
            return original + name[len(diffusers) :]
    if m := _DOWN.match(name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers_per_block + 1) + layer
        return (
            f"input_blocks.{index}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{index}.1.{rest}"
        )
    if m := _DOWNSAMPLE.match(name):
        index = (int(m[1]) + 1) * (layers_per_block + 1)
        return f"input_blocks.{index}.0.op.{m[2]}"
    if m := _MID.match(name):
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet(rest)}"
        return f"middle_block.{2 * layer + 1}.{rest}"
    if m := _ZERO.match(name):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := _HINT.match(name):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := _HINT_OUT.match(name):
        return f"input_hint_block.{_hint_out_index(cond_blocks)}.{m[1]}"
    raise ValueError(f"no original name known for ControlNet parameter {name!r}")


def original_names(names: list[str], layers_per_block: int) -> dict[str, str]:
    """{diffusers name: original name} for every parameter name of one ControlNet."""
    cond_blocks = len({n.split(".")[2] for n in names if n.startswith("controlnet_cond_embedding.blocks.")})
    mapping = {n: original_name(n, layers_per_block, cond_blocks) for n in names}
    if len(set(mapping.values())) != len(mapping):  # two parameters on one name would lose one silently
        raise ValueError("two ControlNet parameters map to the same original name")
    return mapping


def is_controlnet_only(name: str) -> bool:
    """Parameters a ControlNet adds to the copied UNet encoder (no counterpart in the base UNet)."""
    return name.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))
