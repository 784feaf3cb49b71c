"""Resource checks before work starts: enough disk for what the stages will write, enough free GPU memory
for training (a warning: it is an estimate), and what to do on OOM.

Estimates are deliberately generous (PNG-compressed images, fp32 caches, AdamW state in every
checkpoint): the point is to refuse a run that cannot fit, not to predict the exact size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from recipe_runner.errors import UserError
from recipe_runner.families import family_of
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.run.estimates import estimate_memory, model_size
from recipe_runner.run.rows import count_rows
from recipe_runner.runfolder.layout import RunFolder

GB = 2**30
PNG_RATIO = 0.5  # PNG bytes per raw RGB byte, pessimistic for photos (flat images compress far better)
TEXT_TOKENS = 77

MEMORY_HINT = (
    "to use less accelerator memory: extends: base/low-vram.yaml (fp16 frozen weights, 8-bit AdamW, "
    "gradient checkpointing, batch 1 with accumulation), or set train.gradient_checkpointing: true, "
    "train.optimizer: adamw_8bit, train.mixed_precision: fp16, a smaller train.batch_size with more "
    "train.gradient_accumulation_steps, train.fp8_base: true (the frozen UNet in fp8, with checkpointing), "
    "or a smaller dataset.resolution; `recipe plan` estimates the effect"
)


def disk_needed(loaded: LoadedRecipe, stages: list[str]) -> dict[str, float]:
    """Bytes each of `stages` will write (an upper-bound estimate)."""
    recipe = loaded.recipe
    res = recipe.dataset.resolution
    rows = count_rows(loaded).rows or 0
    if recipe.dataset.max_samples:
        rows = min(rows, recipe.dataset.max_samples)
    need: dict[str, float] = {}
    if "dataset" in stages:
        need["dataset"] = rows * 2 * res * res * 3 * PNG_RATIO
    if "train" in stages:
        size = model_size(recipe, loaded.base_dir)
        builtin = recipe.model.base.startswith("builtin:")
        cache = 0.0
        if recipe.precomputes:
            latents = rows * 4 * (res // 8) ** 2 * 4 * 2  # mean and std, fp32
            text_dim = 32 if builtin else family_of(recipe).figures.text_width
            cache = latents + rows * TEXT_TOKENS * text_dim * 4
        # A checkpoint holds the ControlNet in fp32 and AdamW's two moments; one more is written before
        # the oldest is removed.
        # With no limit every checkpoint is kept: max_steps / checkpoint_every of them, plus the final one.
        limit = recipe.train.checkpoints_total_limit
        written = recipe.train.max_steps // recipe.train.checkpoint_every + 1
        kept = min(limit + 1, written) if limit else written
        checkpoints = size.controlnet * 4 * 3 * kept
        need["train"] = cache + checkpoints + size.controlnet * 4
    return need


def _free_bytes(path: Path) -> tuple[int, Path]:
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def check_disk(loaded: LoadedRecipe, run_dir: Path, stages: list[str]) -> None:
    """Refuse to start when the stages about to run would not fit on the run folder's disk."""
    need = disk_needed(loaded, stages)
    total = sum(need.values())
    free, where = _free_bytes(run_dir)
    if total <= free:
        return
    parts = ", ".join(f"{k} ≈ {_size(v)}" for k, v in need.items())
    raise UserError(
        f"not enough disk space for {run_dir}: the run needs ≈ {_size(total)} ({parts}) "
        f"but {where} has {free / GB:.2f} GB free",
        hint="free some space, pass --output-dir on a larger disk, lower train.checkpoints_total_limit, "
        "or set dataset.max_samples",
    )


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB"


def warn_accelerator_memory(loaded: LoadedRecipe, stages: list[str], console: Console) -> None:
    """Before a run that trains on a CUDA GPU: warn when `recipe plan`'s estimate is more than the GPU's
    free memory, before the dataset build and the precompute have spent their time."""
    if "train" not in stages:
        return
    import torch  # the training stage is about to import it anyway

    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    need = estimate_memory(loaded.recipe, loaded.base_dir).total_gb
    if need * GB <= free:
        return
    console.print(
        f"[yellow]warning:[/] `recipe plan` estimates {need:.1f} GB per training process, and this GPU has "
        f"{free / GB:.1f} of {total / GB:.1f} GB free: training will likely run out of memory. "
        f"{MEMORY_HINT[0].upper()}{MEMORY_HINT[1:]}; `recipe plan --trace` gives the exact peak."
    )


def check_models(loaded: LoadedRecipe, folder: RunFolder, stages: list[str], console: Console) -> None:
    """Before a dataset build that training will follow: load the models' configs (no weights), so that
    a misspelt hub id, a base of another family or a ControlNet made for another base fails now, not
    after building the dataset, which can take hours. Reads only config and tokenizer files (downloads
    them when online: training needs them anyway)."""
    if not {"dataset", "train"} <= set(stages):
        return
    from recipe_runner.families.loading import load_components, resolve_base

    with console.status("checking model.base and the models it names (configs only)"):
        load_components(loaded, resolve_base(loaded, folder.models_cache), weights=False)
