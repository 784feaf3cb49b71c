"""Which export formats exist, for which model families, and what each output is called (no torch)."""

from __future__ import annotations

from typing import get_args

from recipe_runner.errors import UserError
from recipe_runner.recipe.sections import FAMILY_FORMATS, ExportFormat

FORMATS: tuple[str, ...] = get_args(ExportFormat)
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


def export_file(stem: str, fmt: str, *, dtype: str, rank: int | None) -> str:
    """The name export `fmt` is written under in `RUN/export/`: a folder for `diffusers` and `adapter`,
    one `.safetensors` file otherwise. A Control-LoRA's name carries the rank it was made at (a layer
    with fewer dimensions keeps them all; the file's metadata has the largest rank used)."""
    if fmt == "diffusers":
        return f"{stem}-{dtype}"
    if fmt == "single-file":
        return f"{stem}-{dtype}.safetensors"
    if fmt == "control-lora":
        return f"{stem}-rank{rank}.safetensors"
    return stem
