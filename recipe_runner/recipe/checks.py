"""Checks that need the filesystem: the paths a recipe names exist, hub ids are well-formed.

Run by `recipe validate` and before any stage; no network, no torch, no user code.
"""

from __future__ import annotations

from pathlib import Path

from recipe_runner.errors import Problem, UserError
from recipe_runner.recipe.dataset import HUB_ID_RE
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.shards import shard_files
from recipe_runner.recipe.yaml_io import Path_


def looks_local(ref: str) -> bool:
    """Whether a model or annotator reference is meant as a folder rather than a hub id."""
    return ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1


def problem_at(loaded: LoadedRecipe, path: Path_, msg: str, hint: str | None = None) -> Problem:
    o = loaded.origin_of(path)
    return Problem(
        msg,
        path=".".join(map(str, path)),
        file=o.file if o else str(loaded.path),
        line=o.line if o else None,
        column=o.column if o else None,
        hint=hint,
    )


def _model_ref(loaded: LoadedRecipe, path: Path_, ref: str | None, what: str) -> list[Problem]:
    if ref is None or ref.startswith("builtin:"):
        return []
    local = loaded.resolve(ref)
    if local.exists():
        if not local.is_dir():
            return [problem_at(loaded, path, f"{what} {ref!r} is a file; expected a diffusers folder")]
        return []
    if looks_local(ref):
        return [problem_at(loaded, path, f"{what} folder {ref!r} not found (looked at {local})")]
    if not HUB_ID_RE.match(ref):
        return [
            problem_at(
                loaded,
                path,
                f"{what} {ref!r} is neither an existing folder nor a hub id",
                hint="use 'owner/name' for the hub, or a path starting with ./ for a local folder",
            )
        ]
    return []


def _unreadable_image(path: Path) -> str | None:
    """Why Pillow cannot read `path` as an image (None: it can). Reads the header and checks the data."""
    from PIL import Image, UnidentifiedImageError  # no torch; only when the recipe names images

    try:
        with Image.open(path) as im:
            im.verify()
    except UnidentifiedImageError:
        return "not an image file Pillow knows"
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data; Pillow raises all three
        return str(e) or type(e).__name__
    return None


def check_inputs(loaded: LoadedRecipe) -> list[Problem]:
    """Every problem with the files and ids a valid recipe refers to."""
    r = loaded.recipe
    problems: list[Problem] = []
    src = r.dataset.source
    for key in ("path", "conditioning_dir"):
        ref = getattr(src, key)
        if ref is not None and not loaded.resolve(ref).exists():
            where = loaded.resolve(ref)
            problems.append(
                problem_at(loaded, ("dataset", "source", key), f"{ref!r} not found (looked at {where})")
            )
    if src.webdataset is not None:
        try:
            shard_files(loaded)
        except UserError as e:
            message = e.message.removeprefix("dataset.source.webdataset: ")
            problems.append(problem_at(loaded, ("dataset", "source", "webdataset"), message))
    problems += _model_ref(loaded, ("model", "base"), r.model.base, "base model")
    problems += _model_ref(loaded, ("model", "controlnet"), r.model.controlnet, "controlnet")
    problems += _model_ref(loaded, ("model", "vae"), r.model.vae, "vae")
    annotator = getattr(r.condition, "annotator", None)
    if annotator and looks_local(annotator) and not loaded.resolve(annotator).is_dir():
        problems.append(
            problem_at(loaded, ("condition", "annotator"), f"annotator folder {annotator!r} not found")
        )
    for i, image in enumerate(r.train.validation.conditioning_images):
        where = ("train", "validation", "conditioning_images", i)
        path = loaded.resolve(image)
        if not path.is_file():
            problems.append(
                problem_at(loaded, where, f"conditioning image {image!r} not found (looked at {path})")
            )
        elif (why := _unreadable_image(path)) is not None:  # found now, not after every training step
            problems.append(problem_at(loaded, where, f"conditioning image {image!r} cannot be read: {why}"))
    cfg = r.launch.accelerate_config
    if cfg and not loaded.resolve(cfg).is_file():
        problems.append(
            problem_at(loaded, ("launch", "accelerate_config"), f"accelerate config {cfg!r} not found")
        )
    elif cfg:
        problems += _accelerate_config(loaded, loaded.resolve(cfg))
    return problems


# accelerate's distributed types that train as data-parallel replicas, as recipe-runner's workers do.
DATA_PARALLEL = {
    "NO",
    "MULTI_GPU",
    "MULTI_CPU",
    "MULTI_NPU",
    "MULTI_XPU",
    "MULTI_MLU",
    "MULTI_MUSA",
    "MULTI_HPU",
}


def _accelerate_config(loaded: LoadedRecipe, path: Path) -> list[Problem]:
    """What the workers' `accelerate launch --config_file` would not do as the file says: a strategy
    recipe-runner does not train with yet (it launches data-parallel workers, and the file's FSDP or
    DeepSpeed would be silently dropped), or another number of machines than the recipe's."""
    import yaml

    where = ("launch", "accelerate_config")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [problem_at(loaded, where, f"accelerate config {path} cannot be read: {first}")]
    if not isinstance(config, dict):
        return [problem_at(loaded, where, f"accelerate config {path} is not a mapping of settings")]
    problems = []
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind not in DATA_PARALLEL:
        problems.append(
            problem_at(
                loaded,
                where,
                f"accelerate config {path} asks for distributed_type: {kind}; recipe-runner trains with DDP "
                "(data-parallel workers) only so far, and would otherwise ignore it",
                hint="set distributed_type: MULTI_GPU in the file (on a CPU too), or leave out "
                "launch.accelerate_config on one machine; for a model too big for one GPU: train.fp8_base, "
                "train.gradient_checkpointing and train.optimizer: adamw_8bit",
            )
        )
    machines = config.get("num_machines")
    if machines is not None and machines != loaded.recipe.launch.num_machines:
        problems.append(
            problem_at(
                loaded,
                where,
                f"accelerate config {path} has num_machines: {machines}, the recipe "
                f"launch.num_machines: {loaded.recipe.launch.num_machines}: the processes would wait for "
                "machines that never join",
                hint=f"set launch.num_machines: {machines} in the recipe, or num_machines: "
                f"{loaded.recipe.launch.num_machines} in the file",
            )
        )
    return problems
