"""The run folder layout (see shared/DESIGN.md); every stage reads and writes paths from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Files only a run writes: a folder holding one of them was made by a run (the first two are written
# once its checks pass, `.in-use` while it holds the folder).
RUN_MARKERS = ("run.lock.json", "recipe.resolved.yaml", ".in-use")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def made_by_a_run(self) -> bool:
        """Whether the folder is one a run wrote (so a run may replace what is in it)."""
        return any((self.root / name).is_file() for name in RUN_MARKERS)

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.yaml"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock.json"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def dataset(self) -> Path:
        """Built dataset: `data/` (DatasetDict with `train` and maybe `holdout`), preview.png, report.json."""
        return self.root / "dataset"

    @property
    def dataset_data(self) -> Path:
        return self.dataset / "data"

    @property
    def cache(self) -> Path:
        """Precomputed latents and text embeddings, keyed by content."""
        return self.root / "cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def controlnet(self) -> Path:
        """Final weights in diffusers format."""
        return self.root / "controlnet"

    @property
    def adapter(self) -> Path:
        """A `train.lora` run's PEFT adapter and the ControlNet's own trained modules (for exports)."""
        return self.root / "adapter"

    @property
    def export(self) -> Path:
        """`recipe export` outputs: single-file, Control-LoRA, fp16 diffusers, adapter."""
        return self.root / "export"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        """Tracker logs (TensorBoard event files)."""
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def model_card(self) -> Path:
        return self.root / "README.md"

    @property
    def models_cache(self) -> Path:
        """Builtin models are built once per machine, shared by runs ($RECIPE_RUNNER_CACHE overrides)."""
        root = os.environ.get("RECIPE_RUNNER_CACHE") or Path.home() / ".cache" / "recipe-runner"
        return Path(root) / "models"
