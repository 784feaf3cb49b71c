"""`control-lora`: Stability's Control-LoRA format (stabilityai/control-lora).

One fp16 file under the original key names without a prefix (keys.py): for every weight of two or more
dimensions the ControlNet shares with the base UNet, `<module>.up` and `<module>.down`, low-rank factors
of (ControlNet − UNet) with up @ down the difference (conv weights: down (r, in, kh, kw), up (out, r, 1, 1));
the ControlNet's own modules (conditioning embedding, zero convolutions) and the shared biases and norms
in full; and the `lora_controlnet` marker key that tells loaders what the file is.

How it is read: ComfyUI (`comfy/controlnet.py`, `ControlLora.pre_run` and `ControlLoraOps`) builds the
ControlNet from the diffusion model's own weights, sets every `.weight`/`.bias` key of the file, and
adds `up.flatten(1) @ down.flatten(1)` to the layers that have factors; AUTOMATIC1111's sd-webui-controlnet
detects it by `lora_controlnet` (`scripts/controlnet_model_guess.py`) and does the same
(`scripts/controlnet_lora.py`); diffusers converts it with `convert_sai_sd_control_lora_state_dict_to_peft`
for `ControlNetModel.from_unet(unet).load_lora_adapter(file)`.

From a `train.lora` run the factors are the adapter's own (exact); from a fully trained run they come from a
truncated SVD at a chosen rank, with the relative (Frobenius) error reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recipe_runner.export.keys import is_controlnet_only, original_names

MARKER = "lora_controlnet"
DTYPE = torch.float16


@dataclass
class Factors:
    """What a Control-LoRA file holds, and how well it approximates the ControlNet."""

    state: dict[str, torch.Tensor]
    rank: int | None  # the largest rank of any factor pair (None: no factors)
    relative_error: float  # ||Δ - up·down||_F / ||Δ||_F over every shared weight together (0: exact)
    worst_layer: tuple[str, float] | None = None  # the diffusers layer with the largest relative error
    layers: int = 0  # weights with factors
    extra: dict = field(default_factory=dict)


def _factor_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size):
    """`up` (out, r) and `down` (r, in·kh·kw) in the shapes a conv or linear weight's factors have."""
    r = up.shape[1]
    if len(weight_shape) == 4:
        return up.reshape(weight_shape[0], r, 1, 1), down.reshape(r, *weight_shape[1:])
    return up, down


def _svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, squared error, squared norm) of the best rank-`rank` approximation of `delta` (2-D)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    up = u[:, :r] * s[:r]
    down = vh[:r]
    return up.float(), down.float(), float((s[r:] ** 2).sum()), float((s**2).sum())


def from_difference(
    controlnet: dict[str, torch.Tensor], base: dict[str, torch.Tensor], layers_per_block: int, rank: int
) -> Factors:
    """Truncated-SVD factors of (ControlNet − base) for a fully trained ControlNet. `base`: the state of
    `ControlNetModel.from_unet(base UNet)` (the shared weights under the ControlNet's names)."""
    names = original_names(list(controlnet), layers_per_block)
    state: dict[str, torch.Tensor] = {MARKER: torch.tensor([])}
    error = norm = 0.0
    worst: tuple[str, float] | None = None
    layers = used = 0
    for name, value in controlnet.items():
        value = value.detach().cpu()
        if is_controlnet_only(name) or value.ndim < 2 or name not in base:
            state[names[name]] = value.to(DTYPE).contiguous()
            continue
        delta = (value.float() - base[name].detach().cpu().float()).flatten(1)
        up, down, err, total = _svd(delta, rank)
        error, norm = error + err, norm + total
        if total > 0 and (worst is None or err / total > worst[1] ** 2):
            worst = (name, (err / total) ** 0.5)
        up, down = _factor_shapes(up, down, value.shape)
        stem = names[name].removesuffix(".weight")
        state[f"{stem}.up"] = up.to(DTYPE).contiguous()
        state[f"{stem}.down"] = down.to(DTYPE).contiguous()
        layers, used = layers + 1, max(used, up.shape[1])
    relative = (error / norm) ** 0.5 if norm > 0 else 0.0
    return Factors(state, used or None, relative, worst, layers)


def from_adapter(
    merged: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scales: dict[str, float],
    layers_per_block: int,
) -> Factors:
    """Exact factors from a `train.lora` run: its adapter's lora_B·scale (up) and lora_A (down) for each
    adapted layer; every other shared weight was frozen (the base's: left out, loaders take the UNet's);
    biases, norms and the ControlNet's own modules from the merged ControlNet. `adapter`: PEFT keys
    (`<module>.lora_A.weight`), `scales`: alpha / rank per module."""
    names = original_names(list(merged), layers_per_block)
    state: dict[str, torch.Tensor] = {MARKER: torch.tensor([])}
    adapted = {k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")}
    used = 0
    for name, value in merged.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in adapted:
            a, b = adapter[f"{module}.lora_A.weight"].float(), adapter[f"{module}.lora_B.weight"].float()
            up, down = _factor_shapes(b.flatten(1) * scales.get(module, 1.0), a.flatten(1), value.shape)
            stem = names[name].removesuffix(".weight")
            state[f"{stem}.up"] = up.to(DTYPE).contiguous()
            state[f"{stem}.down"] = down.to(DTYPE).contiguous()
            used = max(used, up.shape[1])
        elif is_controlnet_only(name) or value.ndim < 2:
            state[names[name]] = value.detach().cpu().to(DTYPE).contiguous()
    return Factors(state, used or None, 0.0, None, len(adapted))


def applied(file_state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Control-LoRA file applied as ComfyUI applies one (`ControlLora.pre_run`): from `base`, the base
    UNet's weights under the original names (`ControlNetModel.from_unet` state through keys.py), every
    full key of the file set and `up @ down` added to each factored weight; fp32, original names. To
    check a file against a loader that keeps its biases (diffusers' keeps the UNet's: docs/exports.md)."""
    out = {k: v.float().clone() for k, v in base.items()}
    for key, value in file_state.items():
        if key.endswith(".up"):
            stem = key.removesuffix(".up")
            weight = out[f"{stem}.weight"]
            delta = value.float().flatten(1) @ file_state[f"{stem}.down"].float().flatten(1)
            out[f"{stem}.weight"] = weight + delta.reshape(weight.shape)
        elif not key.endswith(".down") and key != MARKER:
            out[key] = value.float()
    return out
