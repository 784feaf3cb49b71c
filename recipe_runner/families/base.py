"""The interface every model family implements, and the components a loaded family hands to training.

A family is everything that differs between, say, SD 1.5 and SDXL: which parts a base model has and
how to load them, how prompts become embeddings (and what of them to cache), how a noisy input and its
target are made, how the denoiser and the ControlNet are called, which pipeline samples from them,
and the figures `recipe plan` estimates with. Training, evaluation, sampling and the review tools ask
the family (`families.family_of(recipe)`) instead of comparing names.

This module needs no torch: the review tools read the figures. Methods that do import it inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from recipe_runner.recipe.loader import LoadedRecipe
    from recipe_runner.recipe.recipe import Recipe


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the parts that matter for memory; `source` says where they come from."""

    unet: float
    controlnet: float
    vae: float
    text_encoders: float
    source: str


IMAGE_TOKENS_AT_512 = 1024  # SD3's and FLUX.1's: a 512 px image is 64x64 latents in 2x2 patches


@dataclass(frozen=True)
class Figures:
    """What `recipe plan` estimates a family's runs with (no model is loaded for a plan)."""

    size: ModelSize  # published parameter counts of the family's reference base
    # GiB of activations of one image at 512 px, by (half precision, gradient checkpointing)
    activation_gb_per_image_at_512: dict[tuple[bool, bool], float]
    lora_params_per_rank: int  # train.lora's LoRA matrices per unit of rank
    lora_full_params: int  # what train.lora still trains in full (conditioning embedding, zero convs)
    images_per_s_at_512: float  # training throughput on one A100-class GPU in fp16
    text_width: int  # width of the cached text embeddings (all encoders side by side)
    # train.fp8_base: the share of the reference denoiser's weights stored in fp8; the rest (what
    # diffusers' layerwise casting skips: norms, and the transformers' AdaLN modulation) stays in the
    # compute dtype. Counted with training/fp8.py on models/archs.py's architectures (2026-12-06).
    fp8_share: float = 1.0
    # A transformer's activations grow with its tokens: the image's (1,024 at 512 px for SD3's and FLUX.1's
    # 2x2 patches of 8x latents) grow with the pixels, the text's (CLIP and T5) do not. 0: a UNet, whose
    # activations grow with the pixels alone.
    text_tokens: int = 0

    def activation_scale(self, resolution: int) -> float:
        """Activations at `resolution` px over those at 512 px (the figures above)."""
        pixels = (resolution / 512) ** 2
        if not self.text_tokens:
            return pixels
        return (IMAGE_TOKENS_AT_512 * pixels + self.text_tokens) / (IMAGE_TOKENS_AT_512 + self.text_tokens)


@dataclass
class Components:
    """Everything a training step and a validation pipeline need from the base model."""

    family: ModelFamily
    tokenizers: list[Any]
    text_encoders: list[Any]
    vae: Any
    noise_scheduler: Any
    denoiser: Any = None  # the UNet (SD 1.x/2.x/XL) or transformer the ControlNet steers
    controlnet: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> Any:
        """The denoiser under the name the Stable Diffusion UNet families use."""
        return self.denoiser

    @unet.setter
    def unet(self, model: Any) -> None:
        self.denoiser = model

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


class ModelFamily:
    """One model family. Subclasses set the facts and implement the methods; the registry in
    `families/__init__.py` maps the recipe's `model.family` names to instances."""

    name: str  # the recipe's model.family
    label: str  # for messages: "Stable Diffusion 1.x"
    pipeline_name: str  # for messages: "could not load ... as a Stable Diffusion pipeline"
    denoiser_name: str = "UNet"  # what the ControlNet steers, for messages
    denoiser_folder: str = "unet"  # its subfolder in a diffusers pipeline folder
    tokenizer_folders: tuple[str, ...]  # a diffusers pipeline folder's subfolders
    text_encoder_folders: tuple[str, ...]
    native_resolutions: tuple[int, ...]  # what its bases were trained at (px)
    offline_arch: str | None  # models/archs.py's full-size architecture, when a hub id's configs are not here
    hub_tag: str  # the Hub tag a model card of this family carries
    license: str  # the license of the family's reference bases (a model card's default)
    figures: Figures
    pooled_text: bool = False  # its text encoding has a pooled embedding too (cached beside the tokens')
    supports_micro_conditioning: bool = False  # train.micro_conditioning (SDXL's size/crop inputs)
    vae_upcast: bool = False  # the VAE stays in fp32 under mixed precision unless model.vae replaces it
    unused_parameters: bool = False  # its ControlNet has weights no output depends on (DDP must know)
    latent_control: bool = False  # its ControlNet takes the conditioning image as VAE latents (cached too)
    # train.lora: the layers of the copied denoiser PEFT wraps (matched by name suffix), and the name
    # prefixes of what a ControlNet adds to the copy (no pretrained weights to adapt: trained in full).
    lora_targets: tuple[str, ...]
    lora_trained_in_full: tuple[str, ...]

    # --- estimates ---------------------------------------------------------------------------------
    def controlnet_params(self, recipe: Recipe, size: ModelSize) -> float:
        """Parameters of the ControlNet the recipe trains, given its base's sizes."""
        return size.controlnet

    def memory_savers(self, recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
        """Family-specific `model` changes that lower the memory a run needs: (what, model fields)."""
        return []

    # --- loading -----------------------------------------------------------------------------------
    def check_folder(self, recipe: Recipe, folder: Path) -> None:
        """Say what kind of model a local folder holds when it is not one of this family."""
        raise NotImplementedError

    def load(
        self, loaded: LoadedRecipe, base: str, *, denoiser: bool, controlnet: bool, weights: bool
    ) -> Components:
        """The base model's parts on the CPU in fp32, and (`controlnet`) the ControlNet to train; with
        `weights=False`, built on the meta device from the configs alone."""
        raise NotImplementedError

    def new_controlnet(self, loaded: LoadedRecipe, c: Components, *, weights: bool = True) -> Any:
        """A ControlNet initialised from `c`'s denoiser (`model.controlnet: null`)."""
        raise NotImplementedError

    def load_controlnet(self, loaded: LoadedRecipe, c: Components, *, weights: bool = True) -> Any:
        """The ControlNet to fine-tune (model.controlnet), or a new one from the denoiser."""
        from recipe_runner.families.parts import diffusers_model, loading

        spec = loaded.recipe.model
        if spec.controlnet is None:
            return self.new_controlnet(loaded, c, weights=weights)
        local = loaded.resolve(spec.controlnet)
        ref = str(local) if local.is_dir() else spec.controlnet
        with loading("model.controlnet", spec.controlnet):
            controlnet = diffusers_model(self.controlnet_class(), ref, weights)
        self.check_controlnet(loaded, c, controlnet)
        return controlnet

    def check_controlnet(self, loaded: LoadedRecipe, c: Components, controlnet: Any) -> None:
        """A UserError when a ControlNet to fine-tune was made for another base."""
        return None

    def controlnet_class(self) -> type:
        """The diffusers class of its ControlNets (to load trained weights)."""
        raise NotImplementedError

    def check_scheduler(self, recipe: Recipe, c: Components) -> None:
        """A UserError when the base's noise scheduler is one this family cannot train with."""
        raise NotImplementedError

    # --- encoding ----------------------------------------------------------------------------------
    def encode_prompts(self, c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings (batch, tokens, width) and the pooled embeddings (None if it has none)."""
        raise NotImplementedError

    def text_shape(self, c: Components) -> tuple[int, int, int | None]:
        """(tokens, width, pooled width or None) of `encode_prompts`' output, without running it."""
        raise NotImplementedError

    def vae_dtype(self, recipe: Recipe, weight_dtype: torch.dtype) -> torch.dtype:
        import torch

        return torch.float32 if self.vae_upcast and recipe.model.vae is None else weight_dtype

    # --- the training step -------------------------------------------------------------------------
    def timestep_sampler(self, recipe: Recipe, num_timesteps: int) -> Any:
        """A function of a sample's torch.Generator that draws its timestep (index), shape (1,)."""
        raise NotImplementedError

    def noisy_and_target(
        self,
        c: Components,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        recipe: Recipe,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's noisy input at `timesteps` (as drawn), and what it should predict."""
        raise NotImplementedError

    def predict(
        self,
        c: Components,
        controlnet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        inputs: Any,
        recipe: Recipe,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The denoiser's prediction, steered by the ControlNet (`inputs`: training.step.StepInputs)."""
        raise NotImplementedError

    def loss_weights(self, c: Components, timesteps: torch.Tensor, recipe: Recipe) -> torch.Tensor | None:
        """Per-sample loss weights (batch,), or None for the plain mean squared error."""
        raise NotImplementedError

    # --- sampling ----------------------------------------------------------------------------------
    def sampling_scheduler(self, c: Components) -> Any:
        """The scheduler validation samples with, from the training scheduler's config."""
        raise NotImplementedError

    def sampling_kwargs(self, image: Any) -> dict[str, Any]:
        """The ControlNet pipeline's call arguments for a conditioning image."""
        return {"image": image}

    def pipeline(self, c: Components, controlnet: Any, vae: Any, scheduler: Any) -> Any:
        """A diffusers ControlNet pipeline over the components already in memory."""
        raise NotImplementedError

    def pipeline_load_kwargs(self, loaded: LoadedRecipe, base: str) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for loading `base` as a pipeline."""
        return {}

    def pipeline_classes(self) -> tuple[type, type]:
        """(base pipeline, ControlNet pipeline) classes for loading a base for inference."""
        raise NotImplementedError

    def random_pipeline(
        self, tokenizers: list, encoders: list, denoiser: Any, vae: Any, scheduler: Any
    ) -> Any:
        """A base pipeline from random-initialised parts of an offline architecture (models/archs.py)."""
        base_cls, _ = self.pipeline_classes()
        return base_cls(**self.pipeline_parts(tokenizers, encoders, denoiser, vae), scheduler=scheduler)
