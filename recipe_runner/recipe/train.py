"""The `train:` section: every knob of diffusers' train_controlnet.py, with its defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from recipe_runner.recipe.base import FieldError, Section
from recipe_runner.recipe.marks import NOTHING, RESUMES, RETRAINS_IF_SET, RETRAINS_UNLESS_SAME_ROWS

# YAML 1.1 reads an unquoted `no` as false; `mixed_precision: no` means "no", so accept it as such.
Precision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)]


class Validation(Section):
    """Validation grids: prompts and conditions sampled while training."""

    every: int = Field(500, ge=1)
    """Make a validation grid every this many optimizer steps (and at the end)."""
    prompts: list[str] = Field(default_factory=list)
    """Prompts for the grid; empty: the prompts of held-out (or first) dataset rows."""
    conditioning_images: list[str] = Field(default_factory=list)
    """Conditioning image files (relative to the recipe); one for all prompts or one per prompt; empty: those
    of held-out (or first) dataset rows."""
    num_images: int = Field(4, ge=1, le=64)
    """Images generated per prompt."""
    num_rows: int = Field(4, ge=1, le=64)
    """Dataset rows used when `prompts` and `conditioning_images` are empty."""
    num_inference_steps: int = Field(20, ge=1, le=1000)
    """Denoising steps per validation image."""
    guidance_scale: float = Field(7.5, ge=0, le=50)
    """Classifier-free guidance scale for validation images (1 disables guidance)."""

    @model_validator(mode="after")
    def _counts(self) -> Validation:
        n_p, n_c = len(self.prompts), len(self.conditioning_images)
        if n_p and n_c and n_p != n_c and 1 not in (n_p, n_c):
            raise FieldError(
                "conditioning_images",
                f"{n_p} prompts but {n_c} conditioning_images: give one of either, or as many of each",
            )
        if bool(n_p) != bool(n_c):
            raise FieldError(
                "prompts" if n_p else "conditioning_images",
                "give both prompts and conditioning_images, or neither (then held-out dataset rows are used)",
            )
        return self


class MicroConditioning(Section):
    """SDXL's size and crop conditioning (added time ids)."""

    crops_coords_top_left: tuple[int, int] = (0, 0)
    """Crop coordinates (top, left) given to SDXL during training."""


class FlowMatching(Section):
    """Flow-matching families (SD3, FLUX.1): how training timesteps are drawn and the loss weighted, with
    the options and defaults of diffusers' train_controlnet_sd3.py and train_controlnet_flux.py."""

    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = "logit_normal"
    """`logit_normal` and `mode` draw timesteps from that density (SD3's paper: logit-normal favours the
    middle of the schedule); `cosmap` and `sigma_sqrt` draw them uniformly and weight the loss; `none`:
    uniform, unweighted."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = Field(1.0, gt=0)
    """Standard deviation of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale of the `mode` density."""
    precondition_outputs: bool | None = None
    """Precondition the transformer's output as EDM does (prediction × -sigma + noisy input, against the
    clean latents as target); false: it predicts the velocity noise - latents. null: as the family's
    reference script: true for SD3, false for FLUX.1."""
    guidance_scale: float = Field(3.5, ge=0)
    """FLUX.1 bases with a guidance embedding (FLUX.1-dev): the guidance value the transformer is given
    while training (train_controlnet_flux.py's --guidance_scale); bases without one ignore it."""


class LoraSpec(Section):
    """Train a low-rank adapter (LoRA) of the ControlNet instead of all its weights, as Stability's
    Control-LoRA and kohya's ControlNet-LLLite do: the copied encoder (SD) or transformer blocks (SD3,
    FLUX.1) stay frozen in the compute precision, LoRA matrices learn beside their attention,
    feed-forward (and, for SD, convolution) layers, and the parts a ControlNet adds to the copy (the
    conditioning embedding and the zero convolutions, or the control latents' embedding and the
    zero-initialised block projections) train in full. Far fewer trainable weights: no fp32 master copy,
    gradients or optimizer state for the rest. `controlnet/` gets the adapter merged into an ordinary
    ControlNet."""

    rank: int = Field(64, ge=1, le=1024)
    """Rank of each LoRA matrix pair: capacity, and trainable weights, grow with it."""
    alpha: float | None = Field(None, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / rank); null: equal to rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA path during training."""


class TrainSpec(Section):
    """How the ControlNet is trained."""

    max_steps: Annotated[int | None, RESUMES] = Field(10_000, ge=1)
    """Optimizer steps to train for; set null to use `num_epochs` instead."""
    num_epochs: Annotated[int | None, RESUMES] = Field(None, ge=1)
    """Passes over the dataset; used only when `max_steps` is null."""
    batch_size: Annotated[int, RETRAINS_UNLESS_SAME_ROWS] = Field(4, ge=1, le=4096)
    """Images per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this x processes)."""
    learning_rate: float = Field(1e-5, gt=0, le=1)
    """Peak learning rate."""
    scale_lr: bool = False
    """Multiply the learning rate by the effective batch size."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Learning-rate schedule (diffusers.optimization.get_scheduler)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from 0 to the learning rate."""
    lr_num_cycles: int = Field(1, ge=1)
    """Hard restarts of `cosine_with_restarts`."""
    lr_power: float = Field(1.0, gt=0)
    """Power of the `polynomial` schedule."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """AdamW from torch, or 8-bit AdamW from bitsandbytes (extra `bnb`; a CUDA GPU, or bitsandbytes >= 0.50
    on the CPU)."""
    fused_optimizer: bool = True
    """`adamw` only: torch's fused AdamW kernel, one pass over all parameters (the same update, 3-4x
    faster to apply); false: torch's default implementation, as diffusers' train_controlnet.py uses."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_weight_decay: float = Field(1e-2, ge=0)
    """AdamW weight decay."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip gradients to this norm; null: no clipping."""
    mixed_precision: Precision = "no"
    """Autocast precision: `no` (fp32), `fp16` or `bf16`; frozen weights are stored in it too."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    fp8_base: Annotated[bool, RETRAINS_IF_SET] = False
    """Store the frozen UNet's or transformer's weights in fp8 (e4m3), each layer cast up to the compute
    precision only while it runs (diffusers' layerwise casting; kohya's `--fp8_base`): 1 byte a parameter
    instead of 2, about 0.8 GB less at SD 1.5, 2.4 GB at SDXL, 11 GB at FLUX.1-dev. Norm layers keep the
    compute precision. Costs some speed (every layer is cast at every pass) and a little fidelity (the
    ControlNet learns beside an fp8-rounded base; validation samples use it too). Needs
    gradient_checkpointing (without it the backward pass keeps the cast-up copies, and the peak is higher
    than without fp8); not with `compile`."""
    attention: Annotated[Literal["sdpa", "xformers", "eager"], NOTHING] = "sdpa"
    """Attention implementation: PyTorch SDPA (flash/memory-efficient kernels), xformers, or eager."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise)."""
    set_grads_to_none: bool = True
    """Free gradients instead of zeroing them after each step (saves memory)."""
    empty_prompt_ratio: float = Field(0.0, ge=0, le=1)
    """Proportion of prompts replaced by the empty string, so the ControlNet also works without one."""
    snr_gamma: Annotated[float | None, RETRAINS_IF_SET] = Field(None, gt=0)
    """Min-SNR loss weighting (Hang et al. 2023; `--snr_gamma` in diffusers' text-to-image script and
    kohya's `--min_snr_gamma`): each sample's loss weighted by min(SNR, gamma) / SNR (for v-prediction
    / (SNR + 1)), so the easy low-noise timesteps stop dominating; 5 is the paper's value. null: the plain
    mean squared error of the reference ControlNet script."""
    noise_offset: Annotated[float, RETRAINS_IF_SET] = Field(0.0, ge=0, le=1)
    """Offset noise: add this times a per-sample, per-channel constant to the noise, so the model can learn
    very dark and very bright images (kohya's `--noise_offset`; 0.05-0.1 is typical). 0: off."""
    lora: Annotated[LoraSpec | None, RETRAINS_IF_SET] = None
    """Train a LoRA of the ControlNet (`{rank: 64}`) instead of all of it (`pip install
    'recipe-runner[lora]'`); LoRA usually wants a higher learning_rate, such as 1e-4. null: all weights."""
    ema_decay: Annotated[float | None, RETRAINS_IF_SET] = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the ControlNet's weights (diffusers' EMAModel, as its
    text-to-image script's `--use_ema`), its decay ramping up as (1 + step) / (10 + step) to this value.
    Validation samples, `controlnet/` and the evaluation use the average; the trained weights stay in the
    last checkpoint. 0.999-0.9999 is typical; over fewer than about 1 / (1 - decay) steps the average lags
    far behind the training. Costs a second fp32 copy of the ControlNet on the accelerator (1.4 GB at SD
    1.5) unless `ema_offload`. null: off."""
    ema_offload: Annotated[bool, NOTHING] = False  # the same update; only where the average waits
    """Keep the average in host memory between steps, moved to the accelerator for each update (diffusers'
    `--offload_ema`): no accelerator memory between updates, a host-device round trip at each step."""
    precompute: Annotated[bool, NOTHING] = True
    """Encode latents and text embeddings once before training and cache them (steps run only UNet +
    ControlNet); off: encode every batch, as the reference script does. A run shorter than an epoch
    encodes only the rows its steps draw, and a longer one later in the same run folder the rows it
    lacks; every prompt is encoded."""
    channels_last: Annotated[bool, NOTHING] = False
    """Use channels-last memory format for the UNet and ControlNet (faster convolutions on GPUs)."""
    compile: Annotated[bool, NOTHING] = False
    """torch.compile the ControlNet and UNet (slow first steps, faster after)."""
    dataloader_num_workers: Annotated[int | None, NOTHING] = Field(None, ge=0, le=64)
    """Data-loading worker processes; 0: load in the training process; null: 0 on a CPU (workers would take
    its cores from training), else up to 4 per GPU, so the next batch is decoded while the GPU steps."""
    threads: Annotated[int | None, NOTHING] = Field(None, ge=1, le=1024)
    """CPU threads for torch's work in each training process; null: the cores this process may use,
    shared among the recipe's processes on this machine (OMP_NUM_THREADS, when set, wins)."""
    checkpoint_every: Annotated[int, NOTHING] = Field(500, ge=1)
    """Save a resumable checkpoint every this many optimizer steps."""
    checkpoints_total_limit: Annotated[int | None, NOTHING] = Field(None, ge=1)
    """Keep at most this many checkpoints (oldest removed first); null: keep all."""
    nonfinite_loss: Annotated[Literal["stop", "skip"], NOTHING] = "stop"
    """On a NaN or infinite loss: `stop` (keep the last good checkpoint) or `skip` the batch."""
    validation: Annotated[Validation, RESUMES] = Field(default_factory=Validation)
    """Sample grids during training."""
    micro_conditioning: MicroConditioning | None = None
    """SDXL only: size and crop conditioning."""
    flow_matching: Annotated[FlowMatching | None, RETRAINS_IF_SET] = None
    """SD3 and FLUX.1 only: timestep sampling, loss weighting, Flux's guidance; null: the defaults of
    diffusers' SD3 and Flux ControlNet scripts."""

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if (self.max_steps is None) == (self.num_epochs is None):
            raise FieldError("num_epochs", "set exactly one of max_steps and num_epochs (the other to null)")
        if self.max_steps is not None and self.lr_warmup_steps > self.max_steps:
            raise FieldError(
                "lr_warmup_steps",
                f"lr_warmup_steps ({self.lr_warmup_steps}) is longer than max_steps ({self.max_steps})",
            )
        if self.fp8_base and not self.gradient_checkpointing:
            raise FieldError(
                "fp8_base",
                "fp8_base lowers peak memory only with gradient_checkpointing: true; without it the backward "
                "pass keeps each layer's cast-up copy beside the fp8 one (SD 1.5, low-VRAM preset: 6.75 GB "
                "against 6.64 without fp8). Set train.gradient_checkpointing: true, or drop fp8_base",
            )
        if self.fp8_base and self.compile:
            raise FieldError(
                "fp8_base",
                "fp8_base and compile do not combine: the per-layer casting hooks split torch.compile's "
                "graph at every layer, which is then recompiled layer by layer (tiny model, 12 steps: 276 "
                "recompilation messages against 18). Set train.compile: false, or drop fp8_base",
            )
        if self.ema_offload and self.ema_decay is None:
            raise FieldError(
                "ema_offload", "ema_offload without an average: set train.ema_decay (e.g. 0.9999)"
            )
        return self

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps
