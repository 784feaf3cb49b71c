"""Loading the base model and a trained ControlNet as inference pipelines (evaluate and `recipe sample`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recipe_runner.errors import UserError
from recipe_runner.families import family_of, loading
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.layout import RunFolder


def resolve_base(loaded: LoadedRecipe, folder: RunFolder) -> str:
    """`model.base` as something `from_pretrained` accepts (the training stage's resolver)."""
    return loading.resolve_base(loaded, folder.models_cache)


def inference_device() -> tuple[str, torch.dtype]:
    """The device to generate on, and a dtype it runs well."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    if torch.backends.mps.is_available():
        return "mps", torch.float32
    return "cpu", torch.float32


def load_base_pipelines(
    loaded: LoadedRecipe, folder: RunFolder, controlnet: Path | None = None
) -> tuple[Any, Any]:
    """(ControlNet pipeline, base pipeline) sharing one set of base components, on the inference device.

    `controlnet` defaults to the run's final weights; the family picks the pipeline classes.
    """
    from diffusers import AutoencoderKL

    model = loaded.recipe.model
    device, dtype = inference_device()
    family = family_of(loaded.recipe)
    base_cls, control_cls = family.pipeline_classes()
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "revision": model.revision, "variant": model.variant}
    base = resolve_base(loaded, folder)
    kwargs.update(family.pipeline_load_kwargs(loaded, base))
    if model.vae:
        local_vae = loaded.resolve(model.vae)
        kwargs["vae"] = AutoencoderKL.from_pretrained(
            str(local_vae) if local_vae.is_dir() else model.vae, torch_dtype=dtype
        )
    try:
        base_pipe = base_cls.from_pretrained(base, **kwargs)
    except OSError as e:
        raise UserError(
            f"model.base: could not load {base!r} as a {family.pipeline_name} pipeline ({e})",
            hint="check the id or folder, your network, or set model.family",
        ) from None
    weights = family.controlnet_class().from_pretrained(
        str(controlnet or folder.controlnet), torch_dtype=dtype
    )
    # from_pipe shares the base's modules: one copy of the UNet, VAE and text encoders in memory.
    control_pipe = control_cls.from_pipe(base_pipe, controlnet=weights)
    for pipe in (base_pipe, control_pipe):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    return control_pipe, base_pipe
