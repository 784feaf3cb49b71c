"""What the flow-matching transformer families (SD3, FLUX.1) share: timesteps drawn by
`train.flow_matching`'s scheme, z_t = (1 - sigma) x + sigma noise, the loss weighting, control latents
made with the VAE's shift and scale, and the flow-matching sampler.

torch and diffusers are imported inside the methods: `recipe plan` reads the families' figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe_runner.families.base import Components, ModelFamily

if TYPE_CHECKING:
    import torch

    from recipe_runner.recipe.loader import LoadedRecipe
    from recipe_runner.recipe.recipe import Recipe


def flow_settings(recipe: Recipe) -> Any:
    from recipe_runner.recipe.train import FlowMatching

    return recipe.train.flow_matching or FlowMatching()


class FlowMatchingFamily(ModelFamily):
    denoiser_name = "transformer"
    denoiser_folder = "transformer"
    pooled_text = True
    latent_control = True  # the ControlNet takes VAE latents of the conditioning image (see control_latents)
    precondition_by_default: bool  # train.flow_matching.precondition_outputs: null means this
    # train.lora: the joint attention's projections of both streams and both feed-forwards of each copied
    # block (the layers diffusers' SD3 and FLUX.1 LoRA scripts adapt); the families add their own.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    transformer_class_name: str  # the diffusers class of its transformer
    # A new ControlNet's parameters on the family's reference base (counted from models/archs.py's
    # architectures): (fixed, each copied block, each copied single-stream block), and the default counts.
    controlnet_block_params: tuple[float, float, float]
    default_blocks: tuple[int, int]

    # --- estimates ---------------------------------------------------------------------------------
    def controlnet_blocks(self, recipe: Recipe) -> tuple[int, int]:
        """The (blocks, single-stream blocks) a new ControlNet copies, as the recipe asks."""
        m, (blocks, single) = recipe.model, self.default_blocks
        return (
            blocks if m.controlnet_layers is None else m.controlnet_layers,
            single if m.controlnet_single_layers is None else m.controlnet_single_layers,
        )

    def controlnet_params(self, recipe: Recipe, size: Any) -> float:
        if recipe.model.controlnet is not None:  # fine-tuning: the size of the one loaded
            return size.controlnet
        fixed, per_block, per_single = self.controlnet_block_params

        def params(blocks: int, single: int) -> float:
            return fixed + blocks * per_block + single * per_single

        # Scaled, so that a smaller base (a builtin, a local folder) keeps its own figure at the defaults.
        return size.controlnet * params(*self.controlnet_blocks(recipe)) / params(*self.default_blocks)

    # --- loading -----------------------------------------------------------------------------------
    def check_folder(self, recipe: Recipe, folder: Path) -> None:
        from recipe_runner.families.parts import missing_parts, wrong_transformer

        wrong_transformer(recipe, folder, self.label, self.transformer_class_name)
        required = ["transformer", "scheduler", *self.tokenizer_folders[:2], *self.text_encoder_folders[:2]]
        missing_parts(recipe, folder, required + ([] if recipe.model.vae else ["vae"]))

    def text_parts(self, loaded: LoadedRecipe, base: str) -> int:
        """How many of its tokenizer/text-encoder folders to load."""
        return len(self.text_encoder_folders)

    def load(
        self, loaded: LoadedRecipe, base: str, *, denoiser: bool, controlnet: bool, weights: bool
    ) -> Components:
        import diffusers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        from recipe_runner.families.parts import diffusers_model, load_vae, loading, text_encoder

        spec = loaded.recipe.model
        common = {"revision": spec.revision}
        kind = getattr(diffusers, self.transformer_class_name)
        with loading("model.base", base):
            parts = self.text_parts(loaded, base)
            tokenizers = [
                AutoTokenizer.from_pretrained(base, subfolder=sub, **common)
                for sub in self.tokenizer_folders[:parts]
            ]
            encoders = [text_encoder(base, sub, spec, weights) for sub in self.text_encoder_folders[:parts]]
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **common)
            config = kind.load_config(base, subfolder="transformer", **common)
            transformer = (
                diffusers_model(kind, base, weights, subfolder="transformer", variant=spec.variant, **common)
                if denoiser
                else None
            )
        vae = load_vae(loaded, base, AutoencoderKL, weights)
        c = Components(self, tokenizers, encoders, vae, scheduler, transformer)
        # Known also when the transformer is not loaded (the precompute cache's encoders alone).
        c.extra["joint_attention_dim"] = config["joint_attention_dim"]
        if transformer is not None and controlnet:
            c.controlnet = self.load_controlnet(loaded, c, weights=weights)
        return c

    def preconditions(self, recipe: Recipe) -> bool:
        chosen = flow_settings(recipe).precondition_outputs
        return self.precondition_by_default if chosen is None else chosen

    def check_scheduler(self, recipe: Recipe, c: Components) -> None:
        return None  # flow matching: the target is the family's, not the scheduler's

    def control_latents(self, c: Components, conditioning: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The conditioning image ([0, 1]) as the ControlNet takes it: VAE latents, shifted and scaled like
        the image latents (diffusers issues #11867, #11917: the control latents missed the shift). The
        distribution's mean, not a sample: the same input at every step."""
        import torch

        with torch.no_grad():
            pixels = (conditioning * 2 - 1).to(c.vae.device, c.vae.dtype)
            mean = c.vae.encode(pixels).latent_dist.mean
            shift = c.vae.config.shift_factor or 0.0
            return ((mean - shift) * c.vae.config.scaling_factor).to(dtype)

    def step_control(self, c: Components, inputs: Any, dtype: torch.dtype) -> torch.Tensor:
        """This step's control latents: from the precompute cache, or encoded now (reference mode)."""
        if inputs.control_latents is not None:
            return inputs.control_latents.to(dtype)
        return self.control_latents(c, inputs.conditioning, dtype)

    def timestep_sampler(self, recipe: Recipe, num_timesteps: int) -> Any:
        """Draws a timestep index from the recipe's density, with the step's per-sample generator (as
        diffusers' compute_density_for_timestep_sampling, which draws from the global generator)."""
        import torch

        flow = flow_settings(recipe)

        def sample(g: torch.Generator) -> torch.Tensor:
            if flow.weighting_scheme == "logit_normal":
                u = torch.sigmoid(flow.logit_mean + flow.logit_std * torch.randn((1,), generator=g))
            else:
                u = torch.rand((1,), generator=g)
                if flow.weighting_scheme == "mode":
                    u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
            return (u * num_timesteps).long().clamp(0, num_timesteps - 1)

        return sample

    def sigmas(self, c: Components, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The drawn indices' sigmas, shaped to broadcast over `like`."""
        sigmas = c.noise_scheduler.sigmas[indices.cpu()].to(like.device, like.dtype)
        return sigmas.reshape(-1, *([1] * (like.ndim - 1)))

    def noisy_and_target(
        self,
        c: Components,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        recipe: Recipe,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = self.sigmas(c, timesteps, latents)
        noisy = (1.0 - sigmas) * latents + sigmas * noise  # z_t = (1 - t) x + t z_1
        return noisy, latents if self.preconditions(recipe) else noise - latents

    def precondition(
        self,
        c: Components,
        prediction: torch.Tensor,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        recipe: Recipe,
    ) -> torch.Tensor:
        """EDM's preconditioning (section 5 of 2206.00364), when on: -sigma * output + z_t."""
        if not self.preconditions(recipe):
            return prediction
        return prediction * -self.sigmas(c, timesteps, noisy) + noisy

    def loss_weights(self, c: Components, timesteps: torch.Tensor, recipe: Recipe) -> torch.Tensor | None:
        scheme = flow_settings(recipe).weighting_scheme
        if scheme not in ("cosmap", "sigma_sqrt"):  # the others weigh by how they draw timesteps
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = c.noise_scheduler.sigmas[timesteps.cpu()].float()
        return compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).flatten()

    def sampling_scheduler(self, c: Components) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(c.noise_scheduler.config)
