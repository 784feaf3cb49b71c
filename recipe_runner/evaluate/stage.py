"""Evaluate a trained ControlNet: generate from held-out conditions, re-extract, compare with the base model.

`evaluate_pipeline` is the core (training can call it at validation steps with pipelines it already
holds); `evaluate_folder` is the `evaluate` stage over a run folder, writing `evaluation/results.json`,
`evaluation/grid.png`, the model card's evaluation section and TensorBoard scalars.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.markup import escape

import recipe_runner.evaluate.report as report
from recipe_runner.conditions import ConditionFn, build_condition
from recipe_runner.data.cache_key import computes_condition
from recipe_runner.errors import UserError
from recipe_runner.evaluate.metrics import metrics_for
from recipe_runner.evaluate.models import inference_device, load_base_pipelines
from recipe_runner.evaluate.shapes import shape_iou
from recipe_runner.families import family_of
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.sections import EvaluateSpec
from recipe_runner.runfolder.atomic import atomic_dir, is_complete
from recipe_runner.runfolder.layout import RunFolder


def _image_argument(image: Image.Image) -> dict[str, Any]:
    return {"image": image}


def _generate(
    pipe: Any,
    row: dict[str, Any],
    spec: EvaluateSpec,
    seed: int,
    control: Callable[[Image.Image], dict[str, Any]] | None,
) -> Image.Image:
    cond = row["conditioning_image"].convert("RGB")
    # A CPU generator gives the same starting noise on every device, and the same for base and ControlNet.
    kwargs: dict[str, Any] = {
        "prompt": row["prompt"],
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "width": cond.width,
        "height": cond.height,
    }
    if control is not None:  # the ControlNet pipeline: its conditioning image
        kwargs.update(control(cond))
    with torch.inference_mode():
        return pipe(**kwargs).images[0]


def _mean(rows: list[dict[str, float]]) -> dict[str, float | None]:
    """Per-metric mean over the rows that have it, ignoring NaN; None when no row has a value."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, float | None] = {}
    for name in names:
        values = [r[name] for r in rows if name in r and not math.isnan(r[name])]
        out[name] = float(np.mean(values)) if values else None
    return out


def evaluate_pipeline(
    pipe: Any,
    base_pipe: Any | None,
    rows: Iterable[dict[str, Any]],
    condition: ConditionFn,
    spec: EvaluateSpec,
    seed: int,
    *,
    shapes: bool = False,
    reference: str = "conditioning_image",
    on_row: Callable[[], Any] | None = None,
    control_kwargs: Callable[[Image.Image], dict[str, Any]] = _image_argument,
) -> dict[str, Any]:
    """Score `pipe` (a ControlNet pipeline) and optionally `base_pipe` (the same base without it).

    `rows` hold `conditioning_image`, `prompt` and (for `shapes` or reference "image") `image`; row i is
    generated from seed `seed + i` by both pipelines, from the row's conditioning image. The condition
    is re-extracted from every generated image with `condition` and compared, by the metric for the
    condition's type, with the row's conditioning image, or with `reference="image"` with the condition
    extracted from the row's image; `shapes` adds the shape-mask IoU of the builtin shapes data.
    `on_row()` is called after each row (for progress). `control_kwargs(image)`: the ControlNet
    pipeline's arguments for a conditioning image (the family's `sampling_kwargs`).

    Returns {"rows": [{index, prompt, ours, baseline?}], "mean": {"ours", "baseline"?}, "images":
    {"condition", "ours", "baseline"?}}; "images" holds PIL images, so drop it before writing JSON.
    """
    metric = metrics_for(getattr(condition, "type", "custom"))
    settings = {"tolerance": spec.tolerance}
    grid_size = getattr(getattr(condition, "cfg", None), "grid_size", None)
    if grid_size is not None:
        settings["grid_size"] = grid_size
    runs = {
        "ours": (pipe, control_kwargs),
        **({"baseline": (base_pipe, None)} if base_pipe is not None else {}),
    }

    scored: list[dict[str, Any]] = []
    images: dict[str, list[Image.Image]] = {"condition": [], **{who: [] for who in runs}}
    for i, row in enumerate(rows):
        given = row["conditioning_image"].convert("RGB")
        images["condition"].append(given)
        ref = condition.extract(row["image"].convert("RGB")).convert("RGB") if reference == "image" else given
        entry: dict[str, Any] = {"index": i, "prompt": row["prompt"]}
        for who, (p, control) in runs.items():
            generated = _generate(p, row, spec, seed + i, control)
            images[who].append(generated)
            scores = metric(ref, condition.extract(generated), **settings)
            if shapes:
                scores |= shape_iou(row["image"], generated, row["prompt"])
            entry[who] = scores
        scored.append(entry)
        if on_row is not None:
            on_row()
    mean = {who: _mean([r[who] for r in scored]) for who in runs}
    return {"rows": scored, "mean": mean, "images": images}


def reference_for(loaded: LoadedRecipe) -> str:
    """`evaluate.reference` resolved: with auto, the rows' own conditioning images when the dataset stage
    made them with the recipe's condition, else the condition extracted from the rows' images."""
    reference = loaded.recipe.evaluate.reference
    if reference != "auto":
        return reference
    return "conditioning_image" if computes_condition(loaded) else "image"


def _recipe_file(loaded: LoadedRecipe, folder: RunFolder) -> str:
    """The recipe to name in a fix: the user's file, or the run's resolved copy (`recipe evaluate RUN`)."""
    return str(loaded.path if loaded.path.suffix in (".yaml", ".yml") else folder.resolved_recipe)


def _check_weights(loaded: LoadedRecipe, folder: RunFolder) -> None:
    weights = folder.controlnet
    # Training writes the folder atomically (with a `.complete` marker); weights put there by hand have
    # at least diffusers' config.json.
    if is_complete(weights) or (weights / "config.json").is_file():
        return
    recipe_file = _recipe_file(loaded, folder)
    state = "is incomplete (training did not finish)" if weights.exists() else "does not exist"
    raise UserError(
        f"no trained ControlNet to evaluate: {weights} {state}",
        hint=f"train it first: recipe train {recipe_file} --output-dir {folder.root}",
    )


def _holdout_rows(loaded: LoadedRecipe, folder: RunFolder) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    recipe_file = _recipe_file(loaded, folder)
    if not folder.dataset_data.is_dir():
        raise UserError(
            f"no built dataset in {folder.dataset_data}",
            hint=f"build it: recipe build-dataset {recipe_file} --output-dir {folder.root}",
        )
    data = load_from_disk(str(folder.dataset_data))
    if not isinstance(data, DatasetDict) or "holdout" not in data or len(data["holdout"]) == 0:
        raise UserError(
            f"the dataset in {folder.dataset_data} has no held-out rows to evaluate on",
            hint="set dataset.holdout (e.g. 16) in the recipe and rebuild the dataset and weights: "
            f"recipe run {recipe_file} --output-dir {folder.root}",
        )
    return list(data["holdout"])


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("evaluate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def evaluate_folder(
    loaded: LoadedRecipe, folder: RunFolder, *, console: Any = None, step: int | None = None
) -> dict[str, Any]:
    """The evaluate stage: score the run's ControlNet against its base model on the held-out rows.

    Writes `evaluation/` (results.json, grid.png) atomically, replaces the model card's evaluation
    section and logs `evaluate/<metric>` to TensorBoard at `step` (default: `train.max_steps`). Returns
    what results.json holds plus the paths written.
    """
    start = time.perf_counter()
    recipe = loaded.recipe
    spec = recipe.evaluate
    _check_weights(loaded, folder)
    rows = _holdout_rows(loaded, folder)
    device, dtype = inference_device()
    condition = build_condition(recipe.condition, base_dir=loaded.base_dir)
    condition.setup(device)  # a missing annotator or broken custom function fails before the models load
    pipe, base_pipe = load_base_pipelines(loaded, folder)
    shapes = recipe.dataset.source.builtin == "shapes"
    reference = reference_for(loaded)

    with _progress(console) if console is not None else contextlib.nullcontext() as bar:
        advance = functools.partial(bar.advance, bar.add_task("evaluate", total=len(rows))) if bar else None
        out = evaluate_pipeline(
            pipe,
            base_pipe,
            rows,
            condition,
            spec,
            recipe.seed,
            shapes=shapes,
            reference=reference,
            on_row=advance,
            control_kwargs=family_of(recipe).sampling_kwargs,
        )

    images = out.pop("images")
    results: dict[str, Any] = {
        "settings": {
            "condition": recipe.condition.type,
            "base": recipe.model.base,
            "num_rows": len(rows),
            "num_inference_steps": spec.num_inference_steps,
            "guidance_scale": spec.guidance_scale,
            "tolerance": spec.tolerance,
            "reference": reference,
            "seed": recipe.seed,
            "shape_iou": shapes,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
        },
        **out,
        "seconds": round(time.perf_counter() - start, 3),
    }
    grid = report.make_grid(list(zip(images["condition"], images["baseline"], images["ours"], strict=True)))
    with atomic_dir(folder.evaluation) as tmp:
        # NaN is not JSON: metrics without a value (e.g. abs-rel with no valid pixel) are written as null.
        text = json.dumps(_nan_to_none(results), indent=2, allow_nan=False)
        (tmp / "results.json").write_text(text + "\n", encoding="utf-8")
        grid.save(tmp / "grid.png")
    results = _nan_to_none(results)
    link = (folder.evaluation / "grid.png").relative_to(folder.root).as_posix()
    report.update_model_card(folder.model_card, report.card_section(results, link))
    final_step = step if step is not None else recipe.train.max_steps or 0
    report.log_scalars(folder.logs, results["mean"], final_step)
    if console is not None:
        report.print_table(console, results["mean"])
        console.print(f"  evaluation  {escape(str(folder.evaluation))}")
    return {
        **results,
        "results": str(folder.evaluation / "results.json"),
        "grid": str(folder.evaluation / "grid.png"),
    }


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
