"""README.md of the run folder: a hub-style model card with the recipe, data and training figures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from recipe_runner.families import family_of
from recipe_runner.recipe.checks import looks_local
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import write_text
from recipe_runner.runfolder.layout import RunFolder

# The metadata diffusers' training scripts write (save_model_card), so the Hub files and finds the card.
TAGS = ["controlnet", "diffusers-training", "diffusers", "recipe-runner"]
BUILTIN_LICENSE = "apache-2.0"  # the builtin bases are this project's


def _front_matter(loaded: LoadedRecipe) -> str:
    recipe = loaded.recipe
    base, family = recipe.model.base, family_of(recipe)
    builtin = base.startswith("builtin:")
    meta: dict = {}
    if not builtin and not looks_local(base) and not loaded.resolve(base).exists():
        meta["base_model"] = base  # a hub repo id: the Hub links the card to it (never a local path)
    meta["license"] = recipe.output.license or (BUILTIN_LICENSE if builtin else family.license)
    meta["library_name"] = "diffusers"
    meta["inference"] = True
    meta["tags"] = [*TAGS, family.hub_tag]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


_REPORT_FIELDS = (
    "source",
    "streaming",
    "rows_out",
    "rows_dropped",
    "resolution",
    "buckets",
    "columns",
    "data_sha256",
)


def _dataset_summary(folder: RunFolder) -> str:
    """The dataset report's fields a reader of the card cares about (report.json has them all)."""
    try:
        report = json.loads((folder.dataset / "report.json").read_text())
    except (OSError, ValueError):
        return "_No dataset report found._\n"

    def show(value: object) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k}: {v}" for k, v in value.items())
        return str(value)

    rows = [f"| {key} | {show(report[key])} |" for key in _REPORT_FIELDS if key in report]
    if not rows:
        return "_The dataset report has none of the usual fields._\n"
    return "| field | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _figures(results: dict) -> str:
    loss = results.get("final_loss")
    gpu = results.get("peak_memory_accelerator_mb")
    rows = [
        ("optimizer steps", results["steps"]),
        ("images per step", results["images_per_step"]),
        ("learning rate", f"{results['learning_rate']:.3g}"),
        ("processes", results["processes"]),
        ("device", results["device"]),
        ("training time", f"{results['seconds']:.1f} s"),
        ("speed", f"{results['steps_per_second']:.3f} steps/s, {results['images_per_second']:.2f} images/s"),
        ("final loss", f"{loss:.4f}" if loss is not None else "-"),
        ("skipped (non-finite) steps", results.get("skipped_steps", 0)),
        ("peak host memory", f"{results['peak_memory_host_mb']:.0f} MiB"),
        ("peak accelerator memory", f"{gpu:.0f} MiB" if gpu is not None else "-"),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    losses = results.get("losses") or []
    if len(losses) > 1:
        shown = losses[:: max(1, len(losses) // 20)]
        table += "\n\nLoss at logged steps:\n\n| step | loss |\n|---|---|\n"
        table += "\n".join(f"| {int(s)} | {v:.4f} |" for s, v in shown)
    return table + "\n"


def _usage(loaded: LoadedRecipe) -> str:
    """How to load the weights with the family's own diffusers classes, and, for a hub base, sample."""
    family, base = family_of(loaded.recipe), loaded.recipe.model.base
    controlnet_cls, pipeline_cls = family.controlnet_class().__name__, family.pipeline_classes()[1].__name__
    lines = [
        f"from diffusers import {controlnet_cls}, {pipeline_cls}",
        "",
        f'controlnet = {controlnet_cls}.from_pretrained("path/to/this/folder/controlnet")',
    ]
    if not base.startswith("builtin:") and not looks_local(base):
        extra = "".join(f", {k}={v!r}" for k, v in family.pipeline_load_kwargs(loaded, base).items())
        lines.append(f'pipe = {pipeline_cls}.from_pretrained("{base}", controlnet=controlnet{extra})')
    return "```python\n" + "\n".join(lines) + "\n```\n"


def render(loaded: LoadedRecipe, folder: RunFolder, results: dict) -> str:
    recipe = loaded.recipe
    grid = results.get("sample_grid")
    sample = "_No sample grid._\n"
    if grid and Path(grid).is_relative_to(folder.root):
        link = Path(grid).relative_to(folder.root).as_posix()
        sample = f"![validation samples at step {results['steps']}]({link})\n"
    usage = _usage(loaded)
    recipe_yaml = yaml.safe_dump(recipe.resolved_dict(), sort_keys=False)
    parts = [
        _front_matter(loaded),
        f"# {recipe.name}\n",
        f"{recipe.description}\n" if recipe.description else "",
        f"A ControlNet for `{recipe.model.base}` ({recipe.model.resolved_family}), trained with "
        "recipe-runner from the recipe below (`recipe reproduce` re-runs it).\n",
        "The weights are the exponential moving average of the trained ones "
        f"(decay {recipe.train.ema_decay}); the trained weights are in the run's last checkpoint.\n"
        if recipe.train.ema_decay is not None
        else "",
        f"Trained as a LoRA of the ControlNet (rank {recipe.train.lora.rank}), merged into these "
        "weights; the adapter itself is in the run's `adapter/` (`recipe export --format adapter`).\n"
        if recipe.train.lora is not None
        else "",
        "## Samples\n",
        sample,
        "## Use\n",
        usage,
        "## Training\n",
        _figures(results),
        "## Dataset\n",
        _dataset_summary(folder),
        "## Recipe\n",
        f"```yaml\n{recipe_yaml}```\n",
    ]
    return "\n".join(p for p in parts if p)


def write(loaded: LoadedRecipe, folder: RunFolder, results: dict) -> Path:
    write_text(folder.model_card, render(loaded, folder, results))
    return folder.model_card
