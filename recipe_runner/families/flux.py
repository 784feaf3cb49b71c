"""FLUX.1: a double- and single-stream transformer on packed latents with flow-matching noise, as
diffusers' train_controlnet_flux.py.

Text: CLIP-L's pooled output and T5's 512 tokens (FluxPipeline's default length). Latents: 16 channels,
`(mean - shift_factor) * scaling_factor`, packed into 2x2 patches (64 channels a token) with their
position ids; the ControlNet takes the conditioning image as such packed latents. FLUX.1-dev embeds a
guidance value (`train.flow_matching.guidance_scale`, 3.5); bases without the embedding get none. The
transformer takes timesteps in [0, 1] (the scheduler's / 1000). torch and diffusers are imported inside
the methods: `recipe plan` reads this module's figures.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from recipe_runner.errors import UserError
from recipe_runner.families.base import Components, Figures, ModelSize
from recipe_runner.families.flow import FlowMatchingFamily, flow_settings
from recipe_runner.families.stable_diffusion import token_ids

if TYPE_CHECKING:
    import torch

    from recipe_runner.recipe.loader import LoadedRecipe
    from recipe_runner.recipe.recipe import Recipe

T5_TOKENS = 512  # FluxPipeline's max_sequence_length, which train_controlnet_flux.py encodes with
# train_controlnet_flux.py's --num_double_layers / --num_single_layers defaults (see model.controlnet_*)
DEFAULT_DOUBLE_LAYERS, DEFAULT_SINGLE_LAYERS = 4, 4


def _pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxControlNetPipeline

    b, c, h, w = latents.shape
    return FluxControlNetPipeline._pack_latents(latents, b, c, h, w)


class Flux(FlowMatchingFamily):
    name = "flux"
    label = "FLUX.1"
    pipeline_name = "FLUX.1"
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    text_encoder_folders = ("text_encoder", "text_encoder_2")
    native_resolutions = (1024,)
    offline_arch = "flux-dev"
    hub_tag = "flux"
    license = "other"  # FLUX.1-dev's non-commercial license (schnell's is apache-2.0: set output.license)
    transformer_class_name = "FluxTransformer2DModel"
    precondition_by_default = False  # train_controlnet_flux.py: the target is noise - latents
    # FLUX.1-dev's (counted): each double-stream block 349M, each single-stream block 151M with its
    # output projection.
    # The single-stream blocks' MLP and output projections too (the attention's are in the targets).
    lora_targets = (*FlowMatchingFamily.lora_targets, "proj_mlp", "proj_out")
    # The zero-initialised embedding of the control latents and the per-block output projections.
    lora_trained_in_full = ("controlnet_x_embedder.", "controlnet_blocks.", "controlnet_single_blocks.")
    controlnet_block_params = (45.1e6, 349.3e6, 151.0e6)
    default_blocks = (DEFAULT_DOUBLE_LAYERS, DEFAULT_SINGLE_LAYERS)
    figures = Figures(
        # FLUX.1's 12B transformer (19 double + 38 single blocks), a 4 + 4 block ControlNet (2.05B), the
        # 16-channel VAE, CLIP-L (T5-XXL's 4.7B stay on the CPU with the precompute cache). Counted from
        # models/archs.py's flux-dev.
        ModelSize(11.9e9, 2.05e9, 84e6, 123e6, "FLUX.1 sizes: transformer 11.9B, 4+4-block ControlNet 2.05B"),
        # Traced on FLUX.1-dev (benchmarks/memory.py --arch flux-dev --preset low-vram: batch 2 less batch 1
        # at 512 px, the higher of the forward and backward peaks; traced again on 2026-12-06, when the
        # checkpointed figures had been 0.08 and 0.02, which put plan 3.4 GB under the trace at 1024 px).
        {(True, False): 9.63, (True, True): 1.11, (False, False): 14.85, (False, True): 2.07},
        lora_params_per_rank=651_264,  # counted on the full-size architecture with lora_targets
        lora_full_params=75_721_728,
        images_per_s_at_512=0.8,  # not measured: a rough quarter of SDXL's
        text_width=4096,
        # 8.65B of the 11.9B: the AdaLN modulation's 3.25B stay in bf16 (their names hold "norm").
        fp8_share=0.727,
        text_tokens=T5_TOKENS,  # the text stream: T5's tokens (CLIP-L's pooled output is one vector)
    )

    def memory_savers(self, recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
        if recipe.model.controlnet is not None or self.controlnet_blocks(recipe) <= (2, 0):
            return []
        return [
            (
                "model.controlnet_layers: 2 with model.controlnet_single_layers: 0 (a 0.74B ControlNet, the "
                "size of XLabs' FLUX.1 ControlNets; fewer blocks steer less finely)",
                {"controlnet_layers": 2, "controlnet_single_layers": 0},
            )
        ]

    # --- loading -----------------------------------------------------------------------------------
    def new_controlnet(self, loaded: LoadedRecipe, c: Components, *, weights: bool = True) -> Any:
        import torch
        from diffusers import FluxControlNetModel

        spec, config = loaded.recipe.model, c.denoiser.config
        counts = {}
        for field, chosen, default, have in (
            ("controlnet_layers", spec.controlnet_layers, DEFAULT_DOUBLE_LAYERS, config.num_layers),
            (
                "controlnet_single_layers",
                spec.controlnet_single_layers,
                DEFAULT_SINGLE_LAYERS,
                config.num_single_layers,
            ),
        ):
            if chosen is not None and chosen > have:
                raise UserError(
                    f"model.{field} {chosen}: the transformer of {spec.base!r} has {have} such blocks",
                    hint=f"set model.{field} to {have} or fewer",
                )
            counts[field] = min(default, have) if chosen is None else chosen
        torch.manual_seed(loaded.recipe.seed)
        with contextlib.nullcontext() if weights else torch.device("meta"):
            return FluxControlNetModel.from_transformer(
                c.denoiser,
                num_layers=counts["controlnet_layers"],
                num_single_layers=counts["controlnet_single_layers"],
                attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                load_weights_from_transformer=weights,
            )

    def controlnet_class(self) -> type:
        from diffusers import FluxControlNetModel

        return FluxControlNetModel

    # --- encoding ----------------------------------------------------------------------------------
    def encode_prompts(self, c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5's hidden states (batch, 512, 4096) and CLIP-L's pooled output, as FluxPipeline.encode_prompt."""
        device = c.text_encoders[0].device
        pooled = c.text_encoders[0](
            token_ids(c.tokenizers[0], prompts).to(device), output_hidden_states=False
        )
        ids = c.tokenizers[1](
            prompts, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = c.text_encoders[1](ids.to(device), output_hidden_states=False)[0]
        return embeds, pooled.pooler_output

    def text_shape(self, c: Components) -> tuple[int, int, int | None]:
        return T5_TOKENS, c.text_encoders[1].config.d_model, c.text_encoders[0].config.hidden_size

    # --- the training step -------------------------------------------------------------------------
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
        import torch
        from diffusers import FluxControlNetPipeline

        b, _, h, w = noisy.shape
        device = noisy.device
        guidance = None
        if c.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), flow_settings(recipe).guidance_scale, device=device, dtype=dtype)
        common = {
            "hidden_states": _pack(noisy),
            # The transformer scales timesteps by 1000 itself (as the pipeline and the reference pass them).
            "timestep": c.noise_scheduler.timesteps[timesteps.cpu()].to(device) / 1000,
            "guidance": guidance,
            "pooled_projections": inputs.pooled,
            "encoder_hidden_states": inputs.prompt_embeds,
            "txt_ids": torch.zeros(inputs.prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            # One id a 2x2 patch: the packed grid's (h / 2, w / 2) positions, as FluxPipeline.prepare_latents.
            "img_ids": FluxControlNetPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            "return_dict": False,
        }
        control = _pack(self.step_control(c, inputs, dtype))
        blocks, single_blocks = controlnet(controlnet_cond=control, **common)
        packed = c.denoiser(
            controlnet_block_samples=[s.to(dtype) for s in blocks] if blocks is not None else None,
            controlnet_single_block_samples=[s.to(dtype) for s in single_blocks] if single_blocks else None,
            **common,
        )[0]
        f = c.vae_scale_factor
        prediction = FluxControlNetPipeline._unpack_latents(packed, h * f, w * f, f)
        return self.precondition(c, prediction, noisy, timesteps, recipe)

    # --- sampling ----------------------------------------------------------------------------------
    def sampling_kwargs(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}

    def pipeline_parts(self, tokenizers: list, encoders: list, denoiser: Any, vae: Any) -> dict[str, Any]:
        return {
            "transformer": denoiser,
            "vae": vae,
            "text_encoder": encoders[0],
            "tokenizer": tokenizers[0],
            "text_encoder_2": encoders[1],
            "tokenizer_2": tokenizers[1],
        }

    def pipeline(self, c: Components, controlnet: Any, vae: Any, scheduler: Any) -> Any:
        from diffusers import FluxControlNetPipeline

        parts = self.pipeline_parts(c.tokenizers, c.text_encoders, c.denoiser, vae)
        return FluxControlNetPipeline(**parts, controlnet=controlnet, scheduler=scheduler)

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import FluxControlNetPipeline, FluxPipeline

        return FluxPipeline, FluxControlNetPipeline


FLUX = Flux()
