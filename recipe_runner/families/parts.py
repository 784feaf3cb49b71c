"""The from_pretrained helpers the families load their parts with: failures become UserErrors that name
the recipe field, and `weights=False` builds models on the meta device from their configs alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe


@contextlib.contextmanager
def loading(what: str, ref: str) -> Iterator[None]:
    """Turn the OSError/ValueError of a failed from_pretrained into a UserError naming the field."""
    try:
        yield
    except (OSError, ValueError, KeyError) as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise UserError(
            f"could not load {what} from {ref!r}: {first}",
            hint="check the name (and revision); without network access only downloaded models and "
            "local folders load",
        ) from None


def missing_parts(recipe: Any, folder: Path, need: list[str]) -> None:
    """A UserError naming the subfolders of `need` that a local base folder lacks."""
    missing = [name for name in need if not (folder / name).is_dir()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) or ["nothing"]
        raise UserError(
            f"model.base {recipe.model.base!r} ({folder}) lacks {', '.join(s + '/' for s in missing)}; "
            f"found {', '.join(found)}",
            hint="point model.base at a complete diffusers folder (from DiffusionPipeline.save_pretrained)",
        )


def transformer_class(folder: Path) -> str | None:
    """The class a local base's transformer/config.json names (None: it has none, or it cannot be read)."""
    import json

    try:
        return json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def wrong_transformer(recipe: Any, folder: Path, family: str, wanted: str) -> None:
    """A UserError when a local base is a UNet model, or its transformer is not the family's."""
    found = transformer_class(folder)
    if (folder / "unet").is_dir() or (found is not None and found != wanted):
        what = "a UNet (unet/)" if (folder / "unet").is_dir() else f"a {found}"
        raise UserError(
            f"model.base {recipe.model.base!r} has {what}, but the recipe trains a {family} ControlNet "
            f"(a {wanted})",
            hint="use a base of that family, or set model.family to the base's",
        )


def _text_encoder_class(base: str, subfolder: str, revision: str | None) -> type:
    config, _ = PretrainedConfig.get_config_dict(base, subfolder=subfolder, revision=revision)
    names = config.get("architectures") or ["CLIPTextModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise UserError(f"{subfolder} of {base!r} is a {names[0]}, which transformers does not provide")
    return cls


def diffusers_model(cls: Any, ref: str, weights: bool, **kwargs: Any) -> Any:
    """`cls.from_pretrained`, or with `weights=False` the model built from its config alone on the meta
    device: shapes and dtypes, no storage, nothing read but config.json."""
    if weights:
        return cls.from_pretrained(ref, **kwargs)
    kwargs.pop("variant", None)
    config = cls.load_config(ref, **kwargs)
    with torch.device("meta"):
        return cls.from_config(config)


def text_encoder(base: str, sub: str, spec: Any, weights: bool) -> torch.nn.Module:
    """The transformers text encoder in `base`/`sub`, of the class its config names."""
    cls = _text_encoder_class(base, sub, spec.revision)
    if weights:
        return cls.from_pretrained(base, subfolder=sub, variant=spec.variant, revision=spec.revision)
    config = cls.config_class.from_pretrained(base, subfolder=sub, revision=spec.revision)
    with torch.device("meta"):
        return cls(config)


def load_vae(loaded: LoadedRecipe, base: str, cls: Any, weights: bool = True) -> Any:
    """The base's VAE, or `model.vae` (a VAE repository, or a pipeline folder with vae/)."""
    spec = loaded.recipe.model
    if spec.vae is None:
        with loading("the VAE of model.base", base):
            return diffusers_model(
                cls, base, weights, subfolder="vae", revision=spec.revision, variant=spec.variant
            )
    local = loaded.resolve(spec.vae)
    ref = str(local) if local.is_dir() else spec.vae
    # A VAE repository has its config at the top; a whole pipeline folder has it in vae/.
    sub = "vae" if local.is_dir() and not (local / "config.json").is_file() else None
    with loading("model.vae", spec.vae):
        return diffusers_model(cls, ref, weights, subfolder=sub)
