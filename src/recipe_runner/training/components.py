"""Load the frozen base model (tokenizers, text encoders, VAE, UNet, noise scheduler) and the ControlNet.

A base is a hub id, a local diffusers folder or `builtin:NAME`; a wrong kind of folder (an SD 1.5 folder
under an SDXL recipe, a folder without `unet/`) is a UserError that says what was found, not a
KeyError from deep inside diffusers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, PretrainedConfig

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe

_TEXT_PARTS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


@dataclass
class Components:
    """Everything a training step and a validation pipeline need from the base model."""

    family: str
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    unet: UNet2DConditionModel | None = None
    controlnet: ControlNetModel | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image (width: square by default)."""
        f = self.vae_scale_factor
        return (self.vae.config.latent_channels, height // f, (width or height) // f)


def resolve_base(loaded: LoadedRecipe, models_cache: Path) -> str:
    """The base model as something from_pretrained accepts: a folder path (builtins are built on first
    use) or a hub id. Local folders are checked here, hub ids when loading."""
    base = loaded.recipe.model.base
    if base.startswith("builtin:"):
        from recipe_runner.models.tiny import resolve_builtin

        return str(resolve_builtin(base.removeprefix("builtin:"), models_cache))
    local = loaded.resolve(base)
    if local.is_dir():
        return str(local.resolve())
    if local.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise UserError(
            f"model.base {base!r}: no diffusers folder at {local}",
            hint="give a folder with model_index.json, unet/, vae/ ..., a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', or builtin:tiny-sd",
        )
    return base


def _check_folder(recipe: Recipe, folder: Path) -> None:
    """Say what kind of model a local folder holds when it is not what the recipe needs."""
    family = recipe.model.resolved_family
    need = ["unet", "scheduler", "tokenizer", *_TEXT_PARTS[family]]
    if recipe.model.vae is None:
        need.append("vae")
    if family == "sdxl":
        need.append("tokenizer_2")
    missing = [name for name in need if not (folder / name).is_dir()]
    if family == "sdxl" and "text_encoder_2" in missing and (folder / "text_encoder").is_dir():
        raise UserError(
            f"model.base {recipe.model.base!r} looks like a Stable Diffusion 1.x/2.x model "
            "(no text_encoder_2/), but the recipe trains an SDXL ControlNet",
            hint="use an SDXL base (e.g. stabilityai/stable-diffusion-xl-base-1.0), or set model.family: sd1",
        )
    if family != "sdxl" and (folder / "text_encoder_2").is_dir():
        raise UserError(
            f"model.base {recipe.model.base!r} looks like an SDXL model (it has text_encoder_2/), "
            f"but the recipe's model family is {family}",
            hint="set model.family: sdxl, or use an SD 1.x/2.x base",
        )
    if missing:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) or ["nothing"]
        raise UserError(
            f"model.base {recipe.model.base!r} ({folder}) lacks {', '.join(s + '/' for s in missing)}; "
            f"found {', '.join(found)}",
            hint="point model.base at a complete diffusers folder (from DiffusionPipeline.save_pretrained)",
        )


@contextlib.contextmanager
def _loading(what: str, ref: str) -> Iterator[None]:
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


def _text_encoder_class(base: str, subfolder: str, revision: str | None) -> type:
    config, _ = PretrainedConfig.get_config_dict(base, subfolder=subfolder, revision=revision)
    names = config.get("architectures") or ["CLIPTextModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise UserError(f"{subfolder} of {base!r} is a {names[0]}, which transformers does not provide")
    return cls


def _diffusers_model(cls: Any, ref: str, weights: bool, **kwargs: Any) -> Any:
    """`cls.from_pretrained`, or with `weights=False` the model built from its config alone on the meta
    device: shapes and dtypes, no storage, nothing read but config.json."""
    if weights:
        return cls.from_pretrained(ref, **kwargs)
    kwargs.pop("variant", None)
    config = cls.load_config(ref, **kwargs)
    with torch.device("meta"):
        return cls.from_config(config)


def _text_encoder(base: str, sub: str, spec: Any, weights: bool) -> torch.nn.Module:
    cls = _text_encoder_class(base, sub, spec.revision)
    if weights:
        return cls.from_pretrained(base, subfolder=sub, variant=spec.variant, revision=spec.revision)
    config = cls.config_class.from_pretrained(base, subfolder=sub, revision=spec.revision)
    with torch.device("meta"):
        return cls(config)


def load_components(
    loaded: LoadedRecipe, base: str, *, unet: bool = True, controlnet: bool = True, weights: bool = True
) -> Components:
    """Load the base model's parts on the CPU in fp32 (callers move and cast them); with `weights=False`,
    only their configs, tokenizers and scheduler are read and the models are built on the meta device
    (the memory tracer's input)."""
    recipe = loaded.recipe
    spec = recipe.model
    family = spec.resolved_family
    if Path(base).is_dir():
        _check_folder(recipe, Path(base))
    common = {"revision": spec.revision}
    with _loading("model.base", base):
        tokenizers = [AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **common)]
        if family == "sdxl":
            tokenizers.append(AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", **common))
        encoders = [_text_encoder(base, sub, spec, weights) for sub in _TEXT_PARTS[family]]
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **common)
        unet_model = (
            _diffusers_model(
                UNet2DConditionModel, base, weights, subfolder="unet", variant=spec.variant, **common
            )
            if unet
            else None
        )
    if family == "sdxl" and not hasattr(encoders[1], "text_projection"):
        raise UserError(
            f"model.base {spec.base!r}: the second text encoder of an SDXL model must have a projection"
        )
    vae = _load_vae(loaded, base, weights)
    components = Components(family, tokenizers, list(encoders), vae, noise_scheduler, unet_model)
    if unet_model is not None:
        _check_unet(recipe, components)
        if controlnet:
            components.controlnet = load_controlnet(
                loaded, unet_model, vae_scale_factor=components.vae_scale_factor, weights=weights
            )
    return components


def _load_vae(loaded: LoadedRecipe, base: str, weights: bool = True) -> AutoencoderKL:
    spec = loaded.recipe.model
    if spec.vae is None:
        with _loading("the VAE of model.base", base):
            return _diffusers_model(
                AutoencoderKL, base, weights, subfolder="vae", revision=spec.revision, variant=spec.variant
            )
    local = loaded.resolve(spec.vae)
    ref = str(local) if local.is_dir() else spec.vae
    # A VAE repository has its config at the top; a whole pipeline folder has it in vae/.
    sub = "vae" if local.is_dir() and not (local / "config.json").is_file() else None
    with _loading("model.vae", spec.vae):
        return _diffusers_model(AutoencoderKL, ref, weights, subfolder=sub)


def _check_unet(recipe: Recipe, c: Components) -> None:
    unet = c.unet
    assert unet is not None
    width = sum(e.config.hidden_size for e in c.text_encoders)
    if unet.config.cross_attention_dim != width:
        raise UserError(
            f"model.base {recipe.model.base!r}: the UNet expects text embeddings of width "
            f"{unet.config.cross_attention_dim}, the text encoder(s) give {width}",
            hint="check model.family (sd1, sd2, sdxl) and that the folder's parts belong together",
        )
    if (unet.config.addition_embed_type == "text_time") != (c.family == "sdxl"):
        raise UserError(
            f"model.base {recipe.model.base!r}: the UNet {'has' if c.family != 'sdxl' else 'lacks'} SDXL's "
            f"micro-conditioning, but the recipe's model family is {c.family}",
            hint="set model.family to match the base model",
        )


def load_controlnet(
    loaded: LoadedRecipe, unet: UNet2DConditionModel, *, vae_scale_factor: int = 8, weights: bool = True
) -> ControlNetModel:
    """A ControlNet to fine-tune (model.controlnet) or a new one initialised from the UNet's encoder
    (with `weights=False`, on the meta device from the configs)."""
    spec = loaded.recipe.model
    if spec.controlnet is None:
        # The conditioning embedding is randomly initialised: seed it, so every process (and a rerun)
        # starts from the same weights.
        torch.manual_seed(loaded.recipe.seed)
        # Its stride-2 blocks must shrink the conditioning image by the VAE's factor (8 for SD; the
        # builtin shapes base has a 4x VAE): one block fewer per halving.
        blocks = max(1, int(vae_scale_factor).bit_length() - 1)
        channels = (16, 32, 96, 256, 256)[: blocks + 1]
        with contextlib.nullcontext() if weights else torch.device("meta"):
            return ControlNetModel.from_unet(
                unet,
                conditioning_channels=spec.conditioning_channels,
                conditioning_embedding_out_channels=channels,
            )
    local = loaded.resolve(spec.controlnet)
    ref = str(local) if local.is_dir() else spec.controlnet
    with _loading("model.controlnet", spec.controlnet):
        controlnet = _diffusers_model(ControlNetModel, ref, weights)
    _check_fits(spec.controlnet, spec.base, controlnet, unet, vae_scale_factor)
    have = controlnet.config.conditioning_channels
    if have != spec.conditioning_channels:
        raise UserError(
            f"model.controlnet {spec.controlnet!r} takes {have}-channel conditioning images, "
            f"but model.conditioning_channels is {spec.conditioning_channels}",
            hint=f"set model.conditioning_channels: {have}",
        )
    return controlnet


def _check_fits(
    name: str, base: str, controlnet: ControlNetModel, unet: UNet2DConditionModel, vae_scale_factor: int
) -> None:
    """A ControlNet to fine-tune must be one for this base: its encoder the UNet's, its conditioning
    embedding shrinking images by the VAE's factor (else the first step fails on mismatched shapes)."""
    c, u = controlnet.config, unet.config
    wrong = []
    if list(c.block_out_channels) != list(u.block_out_channels):
        wrong.append(
            f"its blocks have {list(c.block_out_channels)} channels, the UNet's {list(u.block_out_channels)}"
        )
    if c.cross_attention_dim != u.cross_attention_dim:
        wrong.append(
            f"it takes text embeddings of width {c.cross_attention_dim}, the UNet {u.cross_attention_dim}"
        )
    shrink = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if shrink != vae_scale_factor:
        wrong.append(f"it shrinks conditioning images {shrink}x, the base's VAE {vae_scale_factor}x")
    if wrong:
        raise UserError(
            f"model.controlnet {name!r} was made for another base than {base!r}: {'; '.join(wrong)}",
            hint="fine-tune a ControlNet trained on this base (or its family), or set model.controlnet: "
            "null to start one from the base's UNet",
        )
