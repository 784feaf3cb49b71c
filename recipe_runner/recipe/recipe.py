"""The whole recipe: the single source of truth for defaults, descriptions and cross-field checks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Annotated

from pydantic import Field, model_validator

from recipe_runner.recipe.base import FieldError, FieldErrors, Section
from recipe_runner.recipe.condition import CannyCondition, Condition
from recipe_runner.recipe.dataset import DatasetSpec
from recipe_runner.recipe.marks import NOTHING, REBUILDS, REEVALUATES, RETRAINS, Effect
from recipe_runner.recipe.model import ModelSpec
from recipe_runner.recipe.sections import FAMILY_FORMATS, EvaluateSpec, LaunchSpec, LoggingSpec, OutputSpec
from recipe_runner.recipe.train import TrainSpec

FLOW_FAMILIES = ("sd3", "flux")  # flow-matching transformers (families/flow.py)
# What the flow-matching families refuse, and why (`recipe plan` offers none as a memory saver for them).
NOT_FOR_FLOW: dict[tuple[str, str], str] = {
    ("train", "snr_gamma"): "Min-SNR weighting is for DDPM noise; flow matching weights its loss with "
    "train.flow_matching.weighting_scheme",
    ("train", "attention"): "eager attention would replace the transformer's joint attention processors",
    ("model", "conditioning_channels"): "its ControlNet takes the VAE latents of an RGB conditioning image",
}


def refused_options(family: str) -> set[str]:
    """The dotted options a family refuses (set to anything but their default)."""
    return {".".join(path) for path in NOT_FOR_FLOW} if family in FLOW_FAMILIES else set()


class Recipe(Section):
    """A recipe-runner recipe: how one ControlNet is trained."""

    extends: Annotated[str | list[str] | None, NOTHING] = None
    """Recipe file(s) this one builds on, relative to this file; mappings merge deeply, lists replace."""
    name: Annotated[str, NOTHING] = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=96)
    """Name of the run (letters, digits, `.`, `_`, `-`); the default run folder is `runs/<name>`."""
    description: Annotated[str, NOTHING] = ""
    """Free text: what this recipe trains and why."""
    seed: Annotated[int, Effect("dataset", resumable=False)] = Field(0, ge=0, le=2**32 - 1)
    """Seed for data order, noise, timesteps and initialisation."""
    condition: Annotated[Condition, REBUILDS] = Field(default_factory=CannyCondition)
    """How conditioning images are made when the data has none (and re-extracted by `evaluate`)."""
    dataset: Annotated[DatasetSpec, REBUILDS]
    """The training data."""
    model: Annotated[ModelSpec, RETRAINS] = Field(default_factory=ModelSpec)
    """Base model and ControlNet."""
    train: Annotated[TrainSpec, RETRAINS] = Field(default_factory=TrainSpec)
    """Training hyperparameters."""
    logging: Annotated[LoggingSpec, NOTHING] = Field(default_factory=LoggingSpec)
    """Metrics tracking."""
    launch: Annotated[LaunchSpec, NOTHING] = Field(default_factory=LaunchSpec)
    """Processes and machines."""
    evaluate: Annotated[EvaluateSpec, REEVALUATES] = Field(default_factory=EvaluateSpec)
    """Condition-fidelity evaluation."""
    output: Annotated[OutputSpec, NOTHING] = Field(default_factory=OutputSpec)
    """The run folder and publishing."""

    @model_validator(mode="after")
    def _cross_section(self) -> Recipe:
        """Every check that spans sections, all of them reported at once (each at its field's line)."""
        family = self.model.resolved_family
        errors: list[FieldError] = []
        if self.train.micro_conditioning is not None and family != "sdxl":
            errors.append(
                FieldError(
                    ("train", "micro_conditioning"),
                    "train.micro_conditioning applies only to SDXL bases, but model.base "
                    f"{self.model.base!r} is {family}; remove it or set model.family: sdxl",
                )
            )
        errors += self._family_options(family)
        errors += self._exports(family)
        if self.dataset.source.streams and self.train.max_steps is None:
            errors.append(
                FieldError(
                    ("train", "num_epochs"),
                    "a streaming source's length is unknown before it is read, so epochs give no step "
                    "count: set train.max_steps (and train.num_epochs: null)",
                )
            )
        if self.evaluate.enabled and self.dataset.holdout == 0:
            errors.append(
                FieldError(
                    ("evaluate", "enabled"),
                    "evaluate.enabled needs held-out rows: set dataset.holdout (e.g. 16)",
                )
            )
        if len(errors) > 1:
            raise FieldErrors(errors)
        if errors:
            raise errors[0]
        return self

    @property
    def images_per_step(self) -> int:
        """Images per optimizer step over every process on every machine (the effective batch)."""
        return self.train.effective_batch * self.launch.total_processes

    @property
    def precomputes(self) -> bool:
        """Whether latents and text embeddings are encoded once into the precompute cache before training:
        `train.precompute`, except with a streaming source, whose rows are not known ahead (each step then
        encodes its rows, as `train.precompute: false` does; the results are the same, only slower)."""
        return self.train.precompute and not self.dataset.source.streams

    def _exports(self, family: str) -> Iterator[FieldError]:
        """output.export: formats that exist for the family and for how the run trains (checked here, so
        that `recipe validate` and `recipe plan` say so, not the end of a long run)."""
        out, lora = self.output, self.train.lora is not None
        for fmt in out.export:
            families = FAMILY_FORMATS[fmt]
            if families is not None and family not in families:
                usable = [f for f, fs in FAMILY_FORMATS.items() if fs is None or family in fs]
                yield FieldError(
                    ("output", "export"),
                    f"there is no {fmt} format for {family} ControlNets (it exists for "
                    f"{', '.join(families)}); formats for {family}: {', '.join(usable)}",
                )
            if fmt == "adapter" and not lora:
                yield FieldError(
                    ("output", "export"),
                    "adapter needs train.lora; this recipe trains every weight (control-lora with "
                    "output.export_rank makes a low-rank file from a fully trained ControlNet)",
                )
            if fmt == "control-lora" and not lora and out.export_rank is None:
                yield FieldError(
                    ("output", "export"),
                    "control-lora of a fully trained ControlNet needs output.export_rank, e.g. 128 (the "
                    "difference to the base UNet is approximated at that rank; the error is reported), or "
                    "train with train.lora",
                )

    def _family_options(self, family: str) -> Iterator[FieldError]:
        """Options that exist for some families only (families/ implements them)."""
        t, m = self.train, self.model
        only = {
            ("train", "flow_matching"): (t.flow_matching is not None, ("sd3", "flux"), "SD3 and FLUX.1"),
            ("model", "controlnet_layers"): (
                m.controlnet_layers is not None,
                ("sd3", "flux"),
                "SD3 and FLUX.1",
            ),
            ("model", "controlnet_single_layers"): (
                m.controlnet_single_layers is not None,
                ("flux",),
                "FLUX.1",
            ),
            ("model", "t5"): (not m.t5, ("sd3",), "SD3 (FLUX.1 needs its T5)"),
        }
        for path, (is_set, families, which) in only.items():
            if is_set and family not in families:
                yield FieldError(
                    path,
                    f"{'.'.join(path)} applies only to {which} bases, but model.base {m.base!r} is {family}; "
                    f"remove it or set model.family: {families[0]}",
                )
        if family not in FLOW_FAMILIES:
            return
        if self.dataset.resolution % 16:
            yield FieldError(
                ("dataset", "resolution"),
                f"{self.dataset.resolution} is no multiple of 16: {family} transformers take latents in 2x2 "
                f"patches of the VAE's 8x; use {self.dataset.resolution // 16 * 16 or 16}",
            )
        used = {
            ("train", "snr_gamma"): t.snr_gamma is not None,
            ("train", "attention"): t.attention == "eager",
            ("model", "conditioning_channels"): m.conditioning_channels != 3,
        }
        for path, why in NOT_FOR_FLOW.items():
            if used[path]:
                yield FieldError(path, f"not for SD3 and FLUX.1 bases: {why}; remove it")

    @property
    def output_dir(self) -> str:
        return self.output.dir or f"runs/{self.name}"

    def resolved_dict(self) -> dict:
        """The resolved recipe as plain data (`extends` already applied, so it is dropped)."""
        return self.model_dump(mode="json", exclude={"extends"})

    def content_hash(self) -> str:
        """Hash of the resolved recipe, stable across key order and formatting."""
        blob = json.dumps(self.resolved_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
