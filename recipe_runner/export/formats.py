"""Which export formats exist, for which model families, and what each output is called (no torch)."""

from __future__ import annotations

from recipe_runner.errors import UserError

FORMATS = ("diffusers", "single-file", "control-lora", "adapter")
# The original ControlNet layout and Control-LoRA exist only for the UNet families (lllyasviel's cldm and
# Stability's Control-LoRA are SD 1.x/2.x and SDXL ControlNets); SD3 and FLUX.1 ControlNets are shared
# in the diffusers layout.
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_FORMATS = {
    "diffusers": None,  # every family
    "single-file": UNET_FAMILIES,
    "control-lora": UNET_FAMILIES,
    "adapter": None,
}
DTYPES = ("fp16", "bf16", "fp32")


def formats_for(family: str) -> list[str]:
    return [f for f, families in FAMILY_FORMATS.items() if families is None or family in families]


def check_format(fmt: str, family: str, *, lora: bool) -> None:
    """A UserError when `fmt` is unknown, does not exist for `family`, or needs a LoRA run."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", hint=f"formats: {', '.join(FORMATS)}")
    families = FAMILY_FORMATS[fmt]
    if families is not None and family not in families:
        raise UserError(
            f"there is no {fmt} format for {family} ControlNets (it exists for {', '.join(families)})",
            hint=f"formats for {family}: {', '.join(formats_for(family))}",
        )
    if fmt == "adapter" and not lora:
        raise UserError(
            "--format adapter needs a train.lora run; this run trained every weight",
            hint="--format control-lora --rank N makes a low-rank file from a fully trained ControlNet",
        )


def export_name(run: str, family: str, condition: str, steps: int | None, fmt: str) -> str:
    """`<run>-<family>-<condition>-step<N>-<fmt>`: what the file is, without opening it."""
    step = f"step{steps}" if steps is not None else "step-unknown"
    return f"{run}-{family}-{condition}-{step}-{fmt}"
