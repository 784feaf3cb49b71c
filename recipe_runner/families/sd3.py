"""Stable Diffusion 3 and 3.5: an MMDiT transformer with flow-matching noise, as diffusers'
train_controlnet_sd3.py.

Text: CLIP-L and CLIP-G (penultimate layers side by side, padded to T5's width) followed by T5's tokens,
and both CLIPs' pooled outputs; without a T5 encoder (SD3 runs without it) its tokens are zeros, as in
diffusers' pipeline. Latents: 16 channels, `(mean - shift_factor) * scaling_factor`, and the ControlNet
takes the conditioning image as such latents too (diffusers issues #11867, #11917: the control latents
missed the shift). Timesteps are drawn by `train.flow_matching`'s scheme. torch and diffusers are
imported inside the methods: `recipe plan` reads this module's figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe_runner.errors import UserError
from recipe_runner.families.base import Components, Figures, ModelSize
from recipe_runner.families.flow import FlowMatchingFamily
from recipe_runner.families.stable_diffusion import token_ids

if TYPE_CHECKING:
    import torch

    from recipe_runner.recipe.loader import LoadedRecipe
    from recipe_runner.recipe.recipe import Recipe

# T5 tokens per prompt: diffusers' train_controlnet_sd3.py trains with 77 (its --max_sequence_length);
# sampling passes the same, so that validation sees what training did (the pipeline's default is 256).
T5_TOKENS = 77
DEFAULT_CONTROLNET_LAYERS = 12  # train_controlnet_sd3.py's default


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    label = "Stable Diffusion 3"
    pipeline_name = "Stable Diffusion 3"
    tokenizer_folders = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_folders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    native_resolutions = (1024,)
    offline_arch = "sd35m"
    hub_tag = "sd3"
    license = "other"  # the Stability AI Community License
    transformer_class_name = "SD3Transformer2DModel"
    precondition_by_default = True  # train_controlnet_sd3.py's --precondition_outputs 1
    # The ControlNet's last block still computes the text stream, which no output uses: its weights get
    # no gradient (found by the two-process test; DDP stops on them otherwise).
    unused_parameters = True
    # The zero-initialised input embedding of the control latents and the per-block output projections.
    lora_trained_in_full = ("pos_embed_input.", "controlnet_blocks.")
    controlnet_block_params = (14.6e6, 103.8e6, 0.0)  # SD 3.5 Medium's (counted); no single-stream blocks
    default_blocks = (DEFAULT_CONTROLNET_LAYERS, 0)
    figures = Figures(
        # SD 3.5 Medium's MMDiT (2.24B, and 0.23B of position embeddings), a 12-block ControlNet (half of
        # its 24 blocks), the 16-channel VAE, CLIP-L + CLIP-G (T5-XXL's 4.7B stay on the CPU with the
        # precompute cache). Counted from models/archs.py's sd35m.
        ModelSize(2.47e9, 1.26e9, 84e6, 818e6, "SD 3.5 Medium sizes: MMDiT 2.5B, 12-block ControlNet 1.26B"),
        # Traced on SD 3.5 Medium (benchmarks/memory.py --arch sd35m --preset low-vram: batch 2 less batch 1
        # at 512 px, the higher of the forward and backward peaks; checkpointed figures traced again on
        # 2026-12-06, when they had been 0.20 and 0.17).
        {(True, False): 3.94, (True, True): 0.28, (False, False): 5.27, (False, True): 0.49},
        lora_params_per_rank=811_008,  # counted on the full-size architecture with lora_targets
        lora_full_params=28_429_824,
        images_per_s_at_512=3.0,  # not measured: SDXL's
        text_width=4096,
        # 1.48B of the 2.47B (the MMDiT's 2.24B parameters and 0.23B of position embeddings): its AdaLN
        # modulation (0.77B) and the position embeddings stay in bf16.
        fp8_share=0.597,
        text_tokens=77 + T5_TOKENS,  # the text stream: CLIP-L and CLIP-G's 77 tokens, then T5's
    )

    # --- loading -----------------------------------------------------------------------------------
    def text_parts(self, loaded: LoadedRecipe, base: str) -> int:
        return 3 if self._uses_t5(loaded, base) else 2

    @staticmethod
    def _uses_t5(loaded: LoadedRecipe, base: str) -> bool:
        """model.t5, and the base has its T5 encoder (a local folder may leave it out; hub bases have it)."""
        folder = Path(base)
        return loaded.recipe.model.t5 and (not folder.is_dir() or (folder / "text_encoder_3").is_dir())

    def new_controlnet(self, loaded: LoadedRecipe, c: Components, *, weights: bool = True) -> Any:
        import torch
        from diffusers import SD3ControlNetModel

        blocks = c.denoiser.config.num_layers
        # The transformer's last block outputs no text stream, so a ControlNet copies at most the others.
        layers = loaded.recipe.model.controlnet_layers or min(DEFAULT_CONTROLNET_LAYERS, blocks - 1)
        if layers >= blocks:
            raise UserError(
                f"model.controlnet_layers {layers}: the transformer of {loaded.recipe.model.base!r} has "
                f"{blocks} blocks, and a ControlNet copies at most {blocks - 1}",
                hint=f"set model.controlnet_layers to {blocks - 1} or fewer (12: diffusers' default)",
            )
        torch.manual_seed(loaded.recipe.seed)  # its zero-initialised parts aside, the same on every rank
        with contextlib.nullcontext() if weights else torch.device("meta"):
            return SD3ControlNetModel.from_transformer(
                c.denoiser,
                num_layers=layers,
                num_extra_conditioning_channels=0,
                load_weights_from_transformer=weights,
            )

    # --- encoding ----------------------------------------------------------------------------------
    def encode_prompts(self, c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch
        import torch.nn.functional as F

        device = c.text_encoders[0].device
        hidden, pooled = [], []
        for tokenizer, encoder in zip(c.tokenizers[:2], c.text_encoders[:2], strict=True):
            out = encoder(token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        if len(c.text_encoders) > 2:
            ids = c.tokenizers[2](
                prompts,
                padding="max_length",
                max_length=T5_TOKENS,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            t5 = c.text_encoders[2](ids.to(device))[0]
        else:
            width = c.extra["joint_attention_dim"]
            t5 = torch.zeros(len(prompts), T5_TOKENS, width, device=device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat(pooled, dim=-1)

    def text_shape(self, c: Components) -> tuple[int, int, int | None]:
        tokens = c.tokenizers[0].model_max_length + T5_TOKENS
        pooled = sum(e.config.projection_dim for e in c.text_encoders[:2])
        return tokens, c.extra["joint_attention_dim"], pooled

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
        t = c.noise_scheduler.timesteps[timesteps.cpu()].to(noisy.device)
        common = {
            "hidden_states": noisy,
            "timestep": t,
            "encoder_hidden_states": inputs.prompt_embeds,
            "pooled_projections": inputs.pooled,
            "return_dict": False,
        }
        control = self.step_control(c, inputs, dtype)
        blocks = controlnet(controlnet_cond=control, **common)[0]
        prediction = c.denoiser(block_controlnet_hidden_states=[b.to(dtype) for b in blocks], **common)[0]
        return self.precondition(c, prediction, noisy, timesteps, recipe)

    def sampling_kwargs(self, image: Any) -> dict[str, Any]:
        return {"control_image": image, "max_sequence_length": T5_TOKENS}

    def pipeline_parts(self, tokenizers: list, encoders: list, denoiser: Any, vae: Any) -> dict[str, Any]:
        t5 = len(encoders) > 2
        return {
            "transformer": denoiser,
            "vae": vae,
            "text_encoder": encoders[0],
            "tokenizer": tokenizers[0],
            "text_encoder_2": encoders[1],
            "tokenizer_2": tokenizers[1],
            "text_encoder_3": encoders[2] if t5 else None,
            "tokenizer_3": tokenizers[2] if t5 else None,
        }

    def pipeline(self, c: Components, controlnet: Any, vae: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusion3ControlNetPipeline

        parts = self.pipeline_parts(c.tokenizers, c.text_encoders, c.denoiser, vae)
        return StableDiffusion3ControlNetPipeline(**parts, controlnet=controlnet, scheduler=scheduler)

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline, StableDiffusion3ControlNetPipeline

    def controlnet_class(self) -> type:
        from diffusers import SD3ControlNetModel

        return SD3ControlNetModel

    def pipeline_load_kwargs(self, loaded: LoadedRecipe, base: str) -> dict[str, Any]:
        return {} if self._uses_t5(loaded, base) else {"text_encoder_3": None, "tokenizer_3": None}


SD3 = StableDiffusion3()
