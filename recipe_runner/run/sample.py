"""`recipe sample RUN_DIR --condition IMG --prompt TEXT`: images from a trained run, saved next to it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from recipe_runner.data.buckets import training_size
from recipe_runner.errors import UserError
from recipe_runner.families import family_of
from recipe_runner.recipe.dataset import DatasetSpec
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.run.lockfile import load_run_recipe
from recipe_runner.runfolder.atomic import is_complete, write_text
from recipe_runner.runfolder.layout import RunFolder


def load_run(run_dir: Path) -> tuple[LoadedRecipe, RunFolder]:
    """The recipe a finished run recorded, and its folder; a clear error when it is not one."""
    folder = RunFolder(Path(run_dir))
    loaded, lock = load_run_recipe(folder)
    if not is_complete(folder.controlnet):
        raise UserError(
            f"{folder.root} has no trained ControlNet yet ({folder.controlnet} is missing or incomplete)",
            hint=f"train it first: recipe run {lock.get('recipe_file', 'FILE')} --output-dir {folder.root}",
        )
    return loaded, folder


def _open_condition(path: Path, spec: DatasetSpec):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"--condition {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--condition {path}: not a readable image ({e})") from None
    size = training_size(spec, image.size)
    if spec.buckets.enabled and image.size != size:
        # Trained on aspect-ratio buckets: centre-crop to the nearest one, as the dataset build does.
        image = ImageOps.fit(image, size, Image.Resampling.BICUBIC)
    elif image.size != size:
        # The ControlNet was trained on square images at the dataset resolution.
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def condition_files(condition: Path) -> list[Path]:
    """The image, or every image in the folder (sorted by name)."""
    if not condition.is_dir():
        return [condition]
    files = sorted(p for p in condition.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(
            f"--condition {condition}: a folder without images",
            hint=f"give an image file, or a folder of {', '.join(sorted(IMAGE_SUFFIXES))} files",
        )
    return files


def sample_run(
    run_dir: Path,
    condition: Path,
    prompt: str,
    *,
    num_images: int = 1,
    steps: int = 20,
    guidance_scale: float = 7.5,
    conditioning_scale: float = 1.0,
    seed: int = 0,
    extract: bool = False,
    notes: Console | None = None,
) -> dict[str, Any]:
    """`num_images` images for the condition image, or for each image of a folder (each from the same
    seed, so that they compare); saved under RUN_DIR/samples/ with a JSON record of the settings."""
    import torch

    from recipe_runner.conditions import build_condition
    from recipe_runner.evaluate.models import load_base_pipelines

    loaded, folder = load_run(run_dir)
    files = condition_files(Path(condition))
    conditions = [_open_condition(f, loaded.recipe.dataset) for f in files]  # all checked before loading
    if extract:
        fn = build_condition(loaded.recipe.condition, base_dir=loaded.base_dir)
        conditions = [fn(image) for image in conditions]
    pipe, _ = load_base_pipelines(loaded, folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder.samples.mkdir(parents=True, exist_ok=True)
    paths, made = [], []
    for file, image in zip(files, conditions, strict=True):
        images = pipe(
            prompt,
            **family_of(loaded.recipe).sampling_kwargs(image),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=conditioning_scale,
            num_images_per_prompt=num_images,
            generator=torch.Generator("cpu").manual_seed(seed),
            height=image.height,
            width=image.width,
        ).images
        name = f"sample-{stamp}-seed{seed}" if len(files) == 1 else f"sample-{stamp}-{file.stem}-seed{seed}"
        these = []
        for i, im in enumerate(images):
            path = folder.samples / f"{name}-{i}.png"
            tmp = path.with_name("." + path.name + ".tmp")
            im.save(tmp, format="PNG")
            tmp.replace(path)
            these.append(str(path))
        paths += these
        made.append({"condition": str(file), "images": these})
    meta = {
        "prompt": prompt,
        "condition": str(condition),
        "extracted": extract,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "conditioning_scale": conditioning_scale,
        "images": paths,
        "conditions": made,
    }
    write_text(folder.samples / f"sample-{stamp}-seed{seed}.json", json.dumps(meta, indent=2) + "\n")
    if notes is not None:  # the CLI's stderr console
        for p in paths:
            notes.print(f"[green]✓[/] {escape(str(p))}")
    return meta
