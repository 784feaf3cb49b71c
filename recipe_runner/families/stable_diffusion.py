"""Stable Diffusion 1.x, 2.x and XL: a UNet with DDPM noise, as diffusers' train_controlnet(_sdxl).py.

SD 1.x and 2.x differ only in their figures (and SD 2's v-prediction, which the scheduler's config
carries); SDXL adds a second text encoder, pooled text embeddings and size/crop micro-conditioning.
torch and diffusers are imported inside the methods: `recipe plan` reads this module's figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe_runner.errors import UserError
from recipe_runner.families.base import Components, Figures, ModelFamily, ModelSize

if TYPE_CHECKING:
    import torch

    from recipe_runner.recipe.loader import LoadedRecipe
    from recipe_runner.recipe.recipe import Recipe


def token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def conditioning_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """A new ControlNet's conditioning embedding: its stride-2 blocks must shrink the conditioning image
    by the VAE's factor (8 for SD; the builtin shapes base has a 4x VAE), one block per halving."""
    blocks = max(1, int(vae_scale_factor).bit_length() - 1)
    return (16, 32, 96, 256, 256)[: blocks + 1]


class StableDiffusion(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden state as the text embedding."""

    tokenizer_folders = ("tokenizer",)
    text_encoder_folders = ("text_encoder",)
    hub_tag = "stable-diffusion"
    pipeline_name = "Stable Diffusion"
    # Every attention projection, transformer feed-forward and resnet convolution of the copied encoder
    # (diffusers' names; the same in SD 1.x, 2.x and SDXL ControlNets); as Stability's Control-LoRA, the
    # conditioning embedding and the zero convolutions train in full.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
    )
    lora_trained_in_full = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")

    def __init__(
        self,
        name: str,
        label: str,
        native_resolutions: tuple[int, ...],
        offline_arch: str,
        license: str,
        figures: Figures,
    ) -> None:
        self.name, self.label, self.native_resolutions = name, label, native_resolutions
        self.offline_arch, self.license, self.figures = offline_arch, license, figures

    # --- loading -----------------------------------------------------------------------------------
    def check_folder(self, recipe: Recipe, folder: Path) -> None:
        from recipe_runner.families.parts import missing_parts

        if (folder / "text_encoder_2").is_dir():
            raise UserError(
                f"model.base {recipe.model.base!r} looks like an SDXL model (it has text_encoder_2/), "
                f"but the recipe's model family is {self.name}",
                hint="set model.family: sdxl, or use an SD 1.x/2.x base",
            )
        missing_parts(recipe, folder, self._parts(recipe))

    def _parts(self, recipe: Recipe) -> list[str]:
        need = ["unet", "scheduler", "tokenizer", *self.text_encoder_folders]
        if recipe.model.vae is None:
            need.append("vae")
        return need + [t for t in self.tokenizer_folders if t != "tokenizer"]

    def load(
        self, loaded: LoadedRecipe, base: str, *, denoiser: bool, controlnet: bool, weights: bool
    ) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        from recipe_runner.families.parts import diffusers_model, load_vae, loading, text_encoder

        spec = loaded.recipe.model
        common = {"revision": spec.revision}
        with loading("model.base", base):
            tokenizers = [
                AutoTokenizer.from_pretrained(base, subfolder=sub, **common) for sub in self.tokenizer_folders
            ]
            encoders = [text_encoder(base, sub, spec, weights) for sub in self.text_encoder_folders]
            noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **common)
            unet = (
                diffusers_model(
                    UNet2DConditionModel, base, weights, subfolder="unet", variant=spec.variant, **common
                )
                if denoiser
                else None
            )
        self._check_encoders(loaded.recipe, encoders)
        vae = load_vae(loaded, base, AutoencoderKL, weights)
        c = Components(self, tokenizers, list(encoders), vae, noise_scheduler, unet)
        if unet is not None:
            self._check_unet(loaded.recipe, c)
            if controlnet:
                c.controlnet = self.load_controlnet(loaded, c, weights=weights)
        return c

    def _check_encoders(self, recipe: Recipe, encoders: list) -> None:
        return None

    def _check_unet(self, recipe: Recipe, c: Components) -> None:
        unet = c.unet
        width = sum(e.config.hidden_size for e in c.text_encoders)
        if unet.config.cross_attention_dim != width:
            raise UserError(
                f"model.base {recipe.model.base!r}: the UNet expects text embeddings of width "
                f"{unet.config.cross_attention_dim}, the text encoder(s) give {width}",
                hint="check model.family (sd1, sd2, sdxl) and that the folder's parts belong together",
            )
        if (unet.config.addition_embed_type == "text_time") != self.supports_micro_conditioning:
            raise UserError(
                f"model.base {recipe.model.base!r}: the UNet "
                f"{'has' if not self.supports_micro_conditioning else 'lacks'} SDXL's "
                f"micro-conditioning, but the recipe's model family is {self.name}",
                hint="set model.family to match the base model",
            )

    def check_controlnet(self, loaded: LoadedRecipe, c: Components, controlnet: Any) -> None:
        spec = loaded.recipe.model
        _check_fits(spec.controlnet, spec.base, controlnet, c.unet, c.vae_scale_factor)
        have = controlnet.config.conditioning_channels
        if have != spec.conditioning_channels:
            raise UserError(
                f"model.controlnet {spec.controlnet!r} takes {have}-channel conditioning images, "
                f"but model.conditioning_channels is {spec.conditioning_channels}",
                hint=f"set model.conditioning_channels: {have}",
            )

    def new_controlnet(self, loaded: LoadedRecipe, c: Components, *, weights: bool = True) -> Any:
        import torch
        from diffusers import ControlNetModel

        # The conditioning embedding is randomly initialised: seed it, so every process (and a rerun)
        # starts from the same weights.
        torch.manual_seed(loaded.recipe.seed)
        with contextlib.nullcontext() if weights else torch.device("meta"):
            return ControlNetModel.from_unet(
                c.unet,
                conditioning_channels=loaded.recipe.model.conditioning_channels,
                conditioning_embedding_out_channels=conditioning_embedding_channels(c.vae_scale_factor),
            )

    def controlnet_class(self) -> type:
        from diffusers import ControlNetModel

        return ControlNetModel

    def check_scheduler(self, recipe: Recipe, c: Components) -> None:
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"the noise scheduler of {recipe.model.base!r} predicts {c.prediction_type!r}; "
                "ControlNet training supports epsilon and v_prediction"
            )

    # --- encoding ----------------------------------------------------------------------------------
    def text_shape(self, c: Components) -> tuple[int, int, int | None]:
        width = sum(e.config.hidden_size for e in c.text_encoders)
        pooled = c.text_encoders[-1].config.hidden_size if self.pooled_text else None
        return c.tokenizers[0].model_max_length, width, pooled

    def encode_prompts(self, c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # SD 1.x/2.x: the last hidden state, no attention mask (as the reference).
        device = c.text_encoders[0].device
        ids = token_ids(c.tokenizers[0], prompts).to(device)
        return c.text_encoders[0](ids, return_dict=False)[0], None

    # --- the training step -------------------------------------------------------------------------
    def timestep_sampler(self, recipe: Recipe, num_timesteps: int) -> Any:
        import torch

        return lambda g: torch.randint(0, num_timesteps, (1,), generator=g)  # uniform, as the reference

    def noisy_and_target(
        self,
        c: Components,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        recipe: Recipe,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
        if c.prediction_type == "epsilon":
            return noisy, noise
        # v_prediction (checked when the session starts)
        return noisy, c.noise_scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, c: Components, timesteps: torch.Tensor, recipe: Recipe) -> torch.Tensor | None:
        """train.snr_gamma: min(SNR, gamma) / SNR (v-prediction: / (SNR + 1)), the weighting of diffusers'
        train_text_to_image.py with --snr_gamma; None: the reference's plain mean."""
        gamma = recipe.train.snr_gamma
        return (
            None if gamma is None else min_snr_weights(c.noise_scheduler, c.prediction_type, timesteps, gamma)
        )

    def added_conditions(
        self, c: Components, inputs: Any, noisy: torch.Tensor, recipe: Recipe, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Extra keyword arguments of the UNet and ControlNet calls (none for SD 1.x/2.x)."""
        return {}

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
        added = self.added_conditions(c, inputs, noisy, recipe, dtype)
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=inputs.prompt_embeds,
            controlnet_cond=inputs.conditioning.to(dtype),
            return_dict=False,
            **added,
        )
        return c.unet(
            noisy,
            timesteps,
            encoder_hidden_states=inputs.prompt_embeds,
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
            **added,
        )[0]

    # --- sampling ----------------------------------------------------------------------------------
    def sampling_scheduler(self, c: Components) -> Any:
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler.from_config(c.noise_scheduler.config)

    def pipeline_parts(self, tokenizers: list, encoders: list, unet: Any, vae: Any) -> dict[str, Any]:
        """The keyword arguments its diffusers pipelines share (with or without a ControlNet)."""
        return {
            "vae": vae,
            "text_encoder": encoders[0],
            "tokenizer": tokenizers[0],
            "unet": unet,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def pipeline(self, c: Components, controlnet: Any, vae: Any, scheduler: Any) -> Any:
        _, control_cls = self.pipeline_classes()
        parts = self.pipeline_parts(c.tokenizers, c.text_encoders, c.unet, vae)
        return control_cls(**parts, controlnet=controlnet, scheduler=scheduler)

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        return StableDiffusionPipeline, StableDiffusionControlNetPipeline


class StableDiffusionXL(StableDiffusion):
    """SDXL: CLIP-L and OpenCLIP-bigG side by side (penultimate layers), the second's pooled output,
    and the size/crop micro-conditioning ("time ids")."""

    tokenizer_folders = ("tokenizer", "tokenizer_2")
    text_encoder_folders = ("text_encoder", "text_encoder_2")
    hub_tag = "stable-diffusion-xl"
    pipeline_name = "SDXL"
    pooled_text = True
    supports_micro_conditioning = True
    vae_upcast = True  # the reference keeps the SDXL VAE in fp32 (it overflows in fp16)

    def check_folder(self, recipe: Recipe, folder: Path) -> None:
        from recipe_runner.families.parts import missing_parts

        if not (folder / "text_encoder_2").is_dir() and (folder / "text_encoder").is_dir():
            raise UserError(
                f"model.base {recipe.model.base!r} looks like a Stable Diffusion 1.x/2.x model "
                "(no text_encoder_2/), but the recipe trains an SDXL ControlNet",
                hint="use an SDXL base (e.g. stabilityai/stable-diffusion-xl-base-1.0), "
                "or set model.family: sd1",
            )
        missing_parts(recipe, folder, self._parts(recipe))

    def _check_encoders(self, recipe: Recipe, encoders: list) -> None:
        if not hasattr(encoders[1], "text_projection"):
            raise UserError(
                f"model.base {recipe.model.base!r}: the second text encoder of an SDXL model must have "
                "a projection"
            )

    def encode_prompts(self, c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        # Penultimate hidden states of both encoders side by side, pooled output of the second.
        device = c.text_encoders[0].device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(c.tokenizers, c.text_encoders, strict=True):
            out = encoder(token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def added_conditions(
        self, c: Components, inputs: Any, noisy: torch.Tensor, recipe: Recipe, dtype: torch.dtype
    ) -> dict[str, Any]:
        assert inputs.pooled is not None
        f = c.vae_scale_factor
        size = (noisy.shape[-2] * f, noisy.shape[-1] * f)
        time_ids = add_time_ids(recipe, len(noisy), noisy.device, dtype, size)
        return {"added_cond_kwargs": {"text_embeds": inputs.pooled, "time_ids": time_ids}}

    def pipeline_parts(self, tokenizers: list, encoders: list, unet: Any, vae: Any) -> dict[str, Any]:
        return {
            "vae": vae,
            "text_encoder": encoders[0],
            "text_encoder_2": encoders[1],
            "tokenizer": tokenizers[0],
            "tokenizer_2": tokenizers[1],
            "unet": unet,
            "add_watermarker": False,
        }

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline


def add_time_ids(
    recipe: Recipe,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (all at the training size:
    `size`, (height, width), for a bucketed batch; else the square resolution)."""
    import torch

    size = size or (recipe.dataset.resolution, recipe.dataset.resolution)
    micro = recipe.train.micro_conditioning
    crop = tuple(micro.crops_coords_top_left) if micro is not None else (0, 0)
    ids = torch.tensor([list(size + crop + size)], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def min_snr_weights(
    scheduler: Any, prediction_type: str, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction, per sample."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    weight = torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return torch.where(snr == 0, 1.0, weight)  # a zero-terminal-SNR schedule's last step: 0 / 0


def _check_fits(name: str, base: str, controlnet: Any, unet: Any, vae_scale_factor: int) -> None:
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


# Published parameter counts (diffusers model cards / `sum(p.numel())` of the released checkpoints).
# Activations: traced with benchmarks/memory.py on the SD 1.5 and SDXL architectures (SDXL at 1024 px,
# divided by 4), 2026-12-01; sd2 is taken as sd1: its traces (SD 2.1 at 512 and 768 px, low-VRAM and
# batch 4) land within 1.3% of that table's estimate. LoRA counts: on models/archs.py's architectures
# with training/lora.py's targets (2026-12-01).
_SD1_ACTIVATIONS = {(True, False): 1.00, (True, True): 0.31, (False, False): 1.76, (False, True): 0.54}

SD1 = StableDiffusion(
    "sd1",
    "Stable Diffusion 1.x",
    native_resolutions=(512,),
    offline_arch="sd15",
    license="creativeml-openrail-m",
    figures=Figures(
        ModelSize(860e6, 361e6, 84e6, 123e6, "SD1.x sizes: UNet 860M, ControlNet 361M, VAE 84M, CLIP-L 123M"),
        _SD1_ACTIVATIONS,
        lora_params_per_rank=403_712,
        lora_full_params=12_566_160,
        images_per_s_at_512=8.0,
        text_width=768,
    ),
)
SD2 = StableDiffusion(
    "sd2",
    "Stable Diffusion 2.x",
    # 768 px for the v-prediction models, 512 for -base; either is fine there
    native_resolutions=(512, 768),
    offline_arch="sd21",
    license="openrail++",
    figures=Figures(
        ModelSize(
            865e6, 364e6, 84e6, 354e6, "SD2.x sizes: UNet 865M, ControlNet 364M, VAE 84M, OpenCLIP-H 354M"
        ),
        _SD1_ACTIVATIONS,
        lora_params_per_rank=407_296,
        lora_full_params=12_566_160,
        images_per_s_at_512=7.5,
        text_width=1024,
    ),
)
SDXL = StableDiffusionXL(
    "sdxl",
    "Stable Diffusion XL",
    native_resolutions=(1024,),
    offline_arch="sdxl",
    license="openrail++",
    figures=Figures(
        ModelSize(
            2.57e9,
            1.25e9,
            84e6,
            818e6,
            "SDXL sizes: UNet 2.57B, ControlNet 1.25B, VAE 84M, CLIP-L + OpenCLIP-bigG 818M",
        ),
        {(True, False): 1.62, (True, True): 0.17, (False, False): 3.01, (False, True): 0.44},
        lora_params_per_rank=1_458_944,
        lora_full_params=7_647_120,
        images_per_s_at_512=3.0,
        text_width=2048 + 1280,
    ),
)
