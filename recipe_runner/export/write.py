"""Writing one export of a trained run: read the weights, convert, write under `RUN/export/` atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from recipe_runner.errors import UserError
from recipe_runner.export.formats import check_format, export_file, export_name
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import atomic_dir, atomic_file, is_complete
from recipe_runner.runfolder.layout import RunFolder

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHTS = "diffusion_pytorch_model.safetensors"

Say = Callable[[str], None]


def _controlnet(folder: RunFolder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run's final ControlNet weights and config."""
    from safetensors.torch import load_file

    if not is_complete(folder.controlnet) or not (folder.controlnet / WEIGHTS).is_file():
        raise UserError(
            f"{folder.root} has no trained weights (controlnet/ is missing or incomplete)",
            hint=f"train first: `recipe run` with its recipe, or `recipe train` into {folder.root}",
        )
    config = json.loads((folder.controlnet / "config.json").read_text())
    return load_file(str(folder.controlnet / WEIGHTS)), config


def _base_controlnet_state(loaded: LoadedRecipe, folder: RunFolder, config: dict) -> dict[str, torch.Tensor]:
    """The base UNet's weights under the ControlNet's names (`ControlNetModel.from_unet`)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from recipe_runner.families.loading import resolve_base
    from recipe_runner.families.parts import loading

    spec = loaded.recipe.model
    base = resolve_base(loaded, folder.models_cache)
    with loading("model.base", base):
        unet = UNet2DConditionModel.from_pretrained(
            base, subfolder="unet", revision=spec.revision, variant=spec.variant
        )
    channels = tuple(config["conditioning_embedding_out_channels"])
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_channels=config["conditioning_channels"],
        conditioning_embedding_out_channels=channels,
    )
    return controlnet.state_dict()


def _save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def export_run(
    loaded: LoadedRecipe,
    folder: RunFolder,
    fmt: str,
    *,
    steps: int | None,
    dtype: str = "fp16",
    rank: int | None = None,
    say: Say = lambda _m: None,
) -> dict[str, Any]:
    """Write export `fmt` of the run in `folder` (trained from `loaded`); return what was written."""
    recipe = loaded.recipe
    family, lora = recipe.model.resolved_family, recipe.train.lora is not None
    check_format(fmt, family, lora=lora)
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}", hint=f"one of {', '.join(DTYPES)}")
    state, config = _controlnet(folder)
    stem = export_name(recipe.name, family, recipe.condition.type, steps, fmt)
    meta = {
        "recipe_name": recipe.name,
        "family": family,
        "condition": recipe.condition.type,
        "steps": str(steps),
        "format": fmt,
        "base_model": recipe.model.base,
    }
    folder.export.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"format": fmt}
    target = folder.export / export_file(stem, fmt, dtype=dtype, rank=None)  # but for control-lora
    if fmt == "diffusers":
        from recipe_runner.families import FAMILIES

        model_cls = FAMILIES[family].controlnet_class()  # SD3 / FLUX.1 ControlNets are their own classes
        model = model_cls.from_pretrained(str(folder.controlnet), torch_dtype=DTYPES[dtype])
        with atomic_dir(target, marker=None) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        result["path"] = str(target)
        result["dtype"] = dtype
    elif fmt == "single-file":
        from recipe_runner.export.single_file import single_file_state

        _save(single_file_state(state, config["layers_per_block"], DTYPES[dtype]), target, meta)
        result.update(path=str(target), dtype=dtype)
    elif fmt == "control-lora":
        result.update(_control_lora(loaded, folder, state, config, stem, meta, lora=lora, rank=rank))
    else:
        from recipe_runner.export.adapter import copy_adapter

        result["path"] = str(copy_adapter(folder, target))
    result["bytes"] = _size(Path(result["path"]))
    say(f"exported {fmt}: {result['path']} ({result['bytes'] / 2**20:.1f} MiB)")
    if note := unreadable_by(fmt, config):
        result["note"] = note
        say(f"note: {note}")
    return result


def unreadable_by(fmt: str, config: dict[str, Any]) -> str | None:
    """Which of the usual readers cannot load this export of a ControlNet of unusual shape (every SD
    1.x/2.x/SDXL base has 2 layers per block and a VAE that shrinks 8x; the demo's shapes-sd has not)."""
    if fmt not in ("single-file", "control-lora"):
        return None
    notes = []
    if len(config["conditioning_embedding_out_channels"]) != 4:
        notes.append(
            "ComfyUI and AUTOMATIC1111 build a fixed conditioning embedding of 4 stages (a VAE that shrinks "
            f"8x); this one has {len(config['conditioning_embedding_out_channels'])}"
        )
    if fmt == "single-file" and config.get("addition_embed_type") == "text_time":
        # 0.42's convert_controlnet_checkpoint never reads `label_emb`: "Cannot copy out of meta tensor".
        notes.append(
            "diffusers' from_single_file cannot read an SDXL ControlNet in this layout (it skips "
            "label_emb); in diffusers load the --format diffusers folder"
        )
    if fmt == "control-lora" and config["layers_per_block"] != 2:
        # convert_sai_sd_control_lora_state_dict_to_peft sets `layers_per_block = 2`.
        notes.append(
            "diffusers' load_lora_adapter reads Control-LoRAs of 2 layers per block only; "
            f"this base has {config['layers_per_block']}"
        )
    return "; ".join(notes) or None


def _control_lora(loaded, folder, state, config, stem, meta, *, lora: bool, rank: int | None) -> dict:
    from recipe_runner.export import control_lora

    lpb = config["layers_per_block"]
    if lora and rank is None:  # exact: the adapter's own factors
        from recipe_runner.export.adapter import read_adapter

        adapter, _ = read_adapter(folder)
        spec = loaded.recipe.train.lora
        scale = (spec.alpha or spec.rank) / spec.rank
        modules = {k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")}
        factors = control_lora.from_adapter(state, adapter, dict.fromkeys(modules, scale), lpb)
        source = "adapter"
    else:
        if rank is None:
            raise UserError(
                "--format control-lora from a fully trained ControlNet needs --rank N (e.g. 64 or 128)",
                hint="the difference to the base UNet is approximated at that rank; the error is reported",
            )
        factors = control_lora.from_difference(
            state, _base_controlnet_state(loaded, folder, config), lpb, rank
        )
        source = "svd"
    named = rank if rank is not None else loaded.recipe.train.lora.rank
    path = folder.export / export_file(stem, "control-lora", dtype="fp16", rank=named)
    meta = {
        **meta,
        "rank": str(factors.rank),
        "source": source,
        "relative_error": f"{factors.relative_error:.6g}",
    }
    _save(factors.state, path, meta)
    out = {
        "path": str(path),
        "rank": factors.rank,
        "source": source,
        "relative_error": factors.relative_error,
    }
    if factors.worst_layer:
        out["worst_layer"] = {"name": factors.worst_layer[0], "relative_error": factors.worst_layer[1]}
    return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
