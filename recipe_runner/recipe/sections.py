"""The small sections: logging, launch, output and evaluate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from recipe_runner.recipe.base import FieldError, Section
from recipe_runner.recipe.marks import RETRAINS, RETRAINS_UNLESS_SAME_ROWS
from recipe_runner.recipe.train import Precision


class LoggingSpec(Section):
    """Where training metrics go."""

    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Experiment tracker: TensorBoard (in the run folder's logs/), wandb (extra `wandb`), or none."""
    project: str | None = None
    """Tracker project name; null: the recipe name."""
    every: int = Field(10, ge=1)
    """Log loss and learning rate every this many optimizer steps."""


class LaunchSpec(Section):
    """How many processes train (through accelerate)."""

    num_processes: Annotated[int, RETRAINS_UNLESS_SAME_ROWS] = Field(1, ge=1, le=1024)
    """Training processes on this machine (one per GPU); >1 trains with DDP."""
    num_machines: Annotated[int, RETRAINS_UNLESS_SAME_ROWS] = Field(1, ge=1, le=1024)
    """Machines taking part; >1 needs `accelerate_config` (see docs/multi-node.md)."""
    mixed_precision: Annotated[Precision | None, RETRAINS] = None
    """Mixed precision for the launched processes; null: `train.mixed_precision`."""
    accelerate_config: str | None = None
    """An accelerate config file (from `accelerate config`), relative to the recipe."""
    main_process_port: int | None = Field(None, ge=1, le=65535)
    """Port for the processes' rendezvous; null: accelerate's default."""

    @property
    def total_processes(self) -> int:
        """Training processes on every machine together."""
        return self.num_processes * self.num_machines

    @model_validator(mode="after")
    def _multi_node(self) -> LaunchSpec:
        if self.num_machines > 1 and not self.accelerate_config:
            raise FieldError(
                "num_machines",
                "num_machines > 1 needs accelerate_config (a file made by `accelerate config`)",
            )
        return self


ExportFormat = Literal["diffusers", "single-file", "control-lora", "adapter"]
# The original ControlNet layout and Control-LoRA exist only for the UNet families (lllyasviel's cldm and
# Stability's Control-LoRA are SD 1.x/2.x and SDXL ControlNets); SD3 and FLUX.1 ControlNets are shared
# in the diffusers layout. None: every family.
FAMILY_FORMATS: dict[str, tuple[str, ...] | None] = {
    "diffusers": None,
    "single-file": ("sd1", "sd2", "sdxl"),
    "control-lora": ("sd1", "sd2", "sdxl"),
    "adapter": None,
}


class OutputSpec(Section):
    """Where the run folder goes and what is published."""

    dir: str | None = Field(None, min_length=1)
    """The run folder, relative to the working directory (`~` expanded); null: `runs/<name>`. It must be
    new, empty or a run folder, and neither hold nor sit inside the data, models or recipes."""
    export: list[ExportFormat] = Field(default_factory=list)
    """Formats `recipe run` exports the trained ControlNet to at the end, into the run's `export/` (as
    `recipe export RUN --format F` does): `diffusers` (fp16/bf16 folder), `single-file` (the original
    layout AUTOMATIC1111 and ComfyUI load; SD 1.x/2.x/XL), `control-lora` (Stability's Control-LoRA;
    SD 1.x/2.x/XL: exact from a `train.lora` run, else at `export_rank`), `adapter` (a `train.lora` run's
    PEFT adapter)."""
    export_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the `diffusers` and `single-file` exports (Control-LoRA files are always fp16)."""
    export_rank: int | None = Field(None, ge=1, le=4096)
    """Rank of a `control-lora` export of a fully trained ControlNet (truncated SVD of its difference to
    the base UNet; the relative error is reported); null: a `train.lora` run's own adapter, exactly."""
    push_to_hub: bool = False
    """Upload the weights, model card, sample grid and exports to `hub_model_id` at the end of `recipe
    run` (`recipe push RUN` does it later). The token comes from HF_TOKEN or `hf auth login`'s cache and is
    never written anywhere; without one, or offline, the run stops before training with exit code 2."""
    hub_model_id: str | None = None
    """Hub repository for `push_to_hub`, as `owner/name`."""
    hub_private: bool = True
    """Create the Hub repository private (an existing repository keeps its visibility)."""
    license: str | None = None
    """License field of the model card; null: the base model's (creativeml-openrail-m for SD 1.x,
    openrail++ for SD 2.x and SDXL, this project's apache-2.0 for the builtin bases)."""

    @model_validator(mode="after")
    def _hub(self) -> OutputSpec:
        if self.push_to_hub and not self.hub_model_id:
            raise FieldError(
                "push_to_hub", "push_to_hub needs hub_model_id (e.g. 'your-name/controlnet-canny')"
            )
        if len(set(self.export)) != len(self.export):
            raise FieldError("export", "each export format once")
        return self


class EvaluateSpec(Section):
    """Condition fidelity: generate from held-out conditions and re-extract the condition."""

    enabled: bool = False
    """Run the evaluate stage in `recipe run` (needs `dataset.holdout` > 0)."""
    num_inference_steps: int = Field(20, ge=1, le=1000)
    """Denoising steps per generated image."""
    guidance_scale: float = Field(1.0, ge=0, le=50)
    """Classifier-free guidance scale for evaluation images."""
    tolerance: int = Field(2, ge=0, le=32)
    """Pixel tolerance when matching edges (edge F1)."""
    reference: Literal["auto", "conditioning_image", "image"] = "auto"
    """What the condition re-extracted from a generated image is compared with: `conditioning_image`, the
    held-out row's own; `image`, the condition extracted from the held-out image the same way (so both
    sides are the same kind, e.g. for data that ships outlines drawn by hand and a canny recipe); auto:
    `conditioning_image` when the dataset stage made it with this condition, else `image`."""
    at_validation: bool = False
    """Also evaluate at every validation step, to show convergence as a curve."""
