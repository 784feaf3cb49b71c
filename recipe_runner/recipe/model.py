"""The `model:` section: the base Stable Diffusion model and the ControlNet to train."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from recipe_runner.recipe.base import Section
from recipe_runner.recipe.marks import RETRAINS_IF_SET

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
BUILTIN_MODELS: dict[str, Family] = {
    "tiny-sd": "sd1",
    "tiny-sdxl": "sdxl",
    "shapes-sd": "sd1",
    "tiny-sd3": "sd3",
    "tiny-flux": "flux",
    "shapes-sd3": "sd3",
}
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub repositories that were removed and re-published under another id (diffusers moved every reference):
# old recipes still load and map to the same family and offline architecture, but `recipe validate` and
# the commands that load a recipe through cli/app.py's load_checked warn (recipe/notices.py): a machine
# without the old one in its hub cache cannot download it. Keys are lower case (hub ids are
# case-insensitive). CompVis' ids are still up.
MOVED_HUB_IDS: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_BASE,
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}


def guess_family(base: str) -> Family:
    """The model family a base name suggests; `family: ...` in the recipe overrides it."""
    if base.startswith("builtin:"):
        return BUILTIN_MODELS.get(base.removeprefix("builtin:"), "sd1")
    low = base.lower()
    if "flux" in low:
        return "flux"
    if "stable-diffusion-3" in low or "sd3" in low or "sd-3" in low:
        return "sd3"
    if "xl" in low:
        return "sdxl"
    if "stable-diffusion-2" in low or "sd2" in low or "sd-2" in low:
        return "sd2"
    return "sd1"


class ModelSpec(Section):
    """The frozen base model and the ControlNet to train."""

    base: str = DEFAULT_BASE
    """The base model: a hub id, a local diffusers folder, or `builtin:tiny-sd` / `builtin:tiny-sdxl` /
    `builtin:tiny-sd3` / `builtin:tiny-flux` (random, for tests) or `builtin:shapes-sd` /
    `builtin:shapes-sd3` (pretrained on the builtin shapes data, for the demos)."""
    family: Family | None = None
    """Model family: `sd1`, `sd2`, `sdxl`, `sd3` (SD 3 and 3.5) or `flux` (FLUX.1); null: guessed from
    `base` (names containing `flux` are FLUX.1, `stable-diffusion-3` or `sd3` SD3, `xl` SDXL)."""
    revision: str | None = None
    """Git revision of the base model on the hub; pin it for reproducible runs."""
    variant: str | None = None
    """Weight variant to load, e.g. `fp16`."""
    controlnet: str | None = None
    """An existing ControlNet (hub id or folder) to fine-tune; null: initialise from the base UNet."""
    vae: str | None = None
    """A VAE to use instead of the base's, e.g. `madebyollin/sdxl-vae-fp16-fix` for SDXL in fp16."""
    conditioning_channels: int = Field(3, ge=1, le=16)
    """Channels of the conditioning image the ControlNet takes."""
    controlnet_layers: Annotated[int | None, RETRAINS_IF_SET] = Field(None, ge=1)
    """SD3 and FLUX.1 only: how many of the transformer's blocks a new ControlNet copies (FLUX.1: its
    double-stream blocks); null: the reference scripts' defaults, 12 for SD3 (or every block but the
    last of a smaller transformer) and 4 for FLUX.1."""
    controlnet_single_layers: Annotated[int | None, RETRAINS_IF_SET] = Field(None, ge=0)
    """FLUX.1 only: how many single-stream blocks a new ControlNet copies. null: 4, the default of
    diffusers' train_controlnet_flux.py (what a run of it without flags trains, so that our runs compare
    with it; FluxControlNetModel's own default is 10 and its README's example 0)."""
    t5: Annotated[bool, RETRAINS_IF_SET] = True
    """SD3 only: encode prompts with the base's T5 encoder too (4.7B parameters, on the CPU while
    training with the precompute cache); false: leave it out, its tokens are zeros, as diffusers' SD3
    pipeline does without it (prompts are then read by the two CLIP encoders alone)."""

    @property
    def resolved_family(self) -> Family:
        return self.family or guess_family(self.base)

    @field_validator("base")
    @classmethod
    def _builtin_known(cls, base: str) -> str:
        name = base.removeprefix("builtin:")
        if base.startswith("builtin:") and name not in BUILTIN_MODELS:
            known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {base!r}; known: {known}")
        return base
