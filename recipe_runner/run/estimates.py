"""Rough accelerator-memory and time estimates for `recipe plan`, from parameter counts alone.

Nothing is loaded: sizes come from a table by model family, from builtin model sizes, or from the
headers of a local folder's safetensors files. Every number here is an estimate (±30% is typical);
the plan says so wherever it shows one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from recipe_runner.families import FAMILIES, ModelSize
from recipe_runner.recipe.loader import resolve_against
from recipe_runner.recipe.recipe import Recipe, refused_options

GIB = 2**30  # cards are sold in GiB ("24 GB"), so every "GB" here is 2**30 bytes
CARD_SIZES_GB = (8, 12, 16, 24, 40, 80)


def fits_card(gb: float) -> int | None:
    """The smallest common card size (GB) that `gb` fits on; None if bigger than all of them."""
    return next((c for c in CARD_SIZES_GB if gb <= c), None)


# Each family's figures (families/stable_diffusion.py ...), by model.family name.
FAMILY_SIZES = {name: f.figures.size for name, f in FAMILIES.items()}
# Counted from the builtin models (recipe_runner.models.tiny): a few MB each.
BUILTIN_SIZES = {
    "tiny-sd": ModelSize(1.43e6, 1.09e6, 1.03e6, 0.04e6, "builtin:tiny-sd (counted)"),
    "tiny-sdxl": ModelSize(1.98e6, 1.38e6, 1.03e6, 0.08e6, "builtin:tiny-sdxl (counted)"),
    "shapes-sd": ModelSize(1.43e6, 1.09e6, 1.03e6, 0.04e6, "builtin:shapes-sd (tiny-sd sized)"),
    "tiny-sd3": ModelSize(0.035e6, 0.029e6, 1.05e6, 0.08e6, "builtin:tiny-sd3 (counted)"),
    "tiny-flux": ModelSize(0.05e6, 0.05e6, 1.05e6, 0.1e6, "builtin:tiny-flux (approximate)"),
    "shapes-sd3": ModelSize(3.48e6, 3.29e6, 0.65e6, 0.24e6, "builtin:shapes-sd3 (counted)"),
}
# Activations of one image at 512 px, GiB, by (half precision, gradient checkpointing): ControlNet under
# autocast and the frozen UNet in the half dtype, SDPA attention (traced; see the families' figures).
ACTIVATION_GB_PER_IMAGE_AT_512 = {n: f.figures.activation_gb_per_image_at_512 for n, f in FAMILIES.items()}
# Autocast's half copies of the ControlNet's weights are saved for backward; gradient checkpointing
# keeps about a fifth of them (those of the block being recomputed, and the unchecked-pointed ends).
CAST_COPIES_KEPT = {False: 1.0, True: 0.2}
# In the backward pass, the gradients fill up while the activations are freed: at its peak about 60% of
# the forward's activations are still there (traced, 0.36-0.61).
BACKWARD_ACTIVATION_SHARE = 0.6
# train.lora's trainable weights: LoRA matrices (linear in the rank), plus the conditioning embedding and
# zero convolutions, trained in full (counted: see the families' figures). Scaled by ControlNet size.
LORA_PARAMS_PER_RANK = {n: f.figures.lora_params_per_rank for n, f in FAMILIES.items()}
LORA_FULL_PARAMS = {n: f.figures.lora_full_params for n, f in FAMILIES.items()}
OVERHEAD_GB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces and allocator slack


def _safetensors_params(folder: Path, variant: str | None) -> int | None:
    """Parameters in a folder's safetensors files, read from their JSON headers only (no weights)."""
    groups: dict[str, list[Path]] = {}
    for f in folder.glob("*.safetensors"):
        # diffusion_pytorch_model[.fp16][-00001-of-00002].safetensors: one variant group is one model.
        parts = f.name.removesuffix(".safetensors").split("-0")[0].split(".")
        groups.setdefault(".".join(parts[1:]), []).append(f)
    files = groups.get("") or groups.get(variant or "") or next(iter(groups.values()), None)
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            try:
                header = json.loads(fh.read(size))
            except ValueError:
                return None
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def model_size(recipe: Recipe, base_dir: Path | None = None) -> ModelSize:
    """Parameter counts for the recipe's model: builtin table, local safetensors headers, or family table."""
    m = recipe.model
    family = m.resolved_family
    if m.base.startswith("builtin:"):
        return BUILTIN_SIZES.get(m.base.removeprefix("builtin:"), BUILTIN_SIZES["tiny-sd"])
    table = FAMILY_SIZES[family]

    def local(ref: str | None) -> Path | None:
        if ref is None:
            return None
        p = resolve_against(base_dir, ref)
        return p if p.is_dir() else None

    base = local(m.base)
    if base is None:
        return table
    denoiser = FAMILIES[family].denoiser_folder
    count = {
        name: _safetensors_params(base / name, m.variant)
        for name in (denoiser, "vae", *FAMILIES[family].text_encoder_folders)
    }
    if count[denoiser] is None:
        return table
    cn_folder = local(m.controlnet)
    controlnet = _safetensors_params(cn_folder, m.variant) if cn_folder else None
    # A ControlNet copies part of the denoiser: keep the family's ControlNet/denoiser ratio when not counted.
    controlnet = controlnet or count[denoiser] * table.controlnet / table.unet
    text = sum(count[name] or 0 for name in FAMILIES[family].text_encoder_folders)
    return ModelSize(
        count[denoiser],
        controlnet,
        count["vae"] or table.vae,
        text or table.text_encoders,
        f"counted from the safetensors headers in {base}",
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak accelerator memory of one training process, in GB (2**30 bytes).

    The peak is the larger of two moments: the end of the forward pass (activations, plus the
    gradients when they are held across micro-steps) and the backward pass (all gradients, part of
    the activations)."""

    frozen_unet_gb: float
    controlnet_training_gb: float  # fp32 weights and optimizer state (and DDP's gradient buckets)
    vae_text_encoders_gb: float
    gradients_gb: float  # the ControlNet's fp32 gradients, where the peak holds them
    activations_gb: float  # saved for backward, with autocast's weight copies, at the peak
    overhead_gb: float
    sizes: ModelSize
    denoiser: str = "UNet"  # what the frozen weights are: the family's UNet or transformer

    @property
    def total_gb(self) -> float:
        return (
            self.frozen_unet_gb
            + self.controlnet_training_gb
            + self.vae_text_encoders_gb
            + self.gradients_gb
            + self.activations_gb
            + self.overhead_gb
        )

    def fits(self) -> int | None:
        """The smallest common card size (GB) this fits on; None if bigger than all of them."""
        return fits_card(self.total_gb)

    def to_dict(self) -> dict:
        parts = {k: round(v, 2) for k, v in asdict(self).items() if k.endswith("_gb")}
        sizes = {k: v for k, v in asdict(self.sizes).items()}
        return {**parts, "total_gb": round(self.total_gb, 2), "fits_card_gb": self.fits(), "params": sizes}


def lora_trainable(recipe: Recipe, sizes: ModelSize) -> float:
    """Trainable parameters of `train.lora`'s ControlNet."""
    family, rank = recipe.model.resolved_family, recipe.train.lora.rank if recipe.train.lora else 0
    scale = sizes.controlnet / FAMILY_SIZES[family].controlnet
    return (LORA_PARAMS_PER_RANK[family] * rank + LORA_FULL_PARAMS[family]) * scale


def estimate_memory(recipe: Recipe, base_dir: Path | None = None) -> MemoryEstimate:
    """Weights, optimizer state, gradients and activations of one process (see the constants above)."""
    t, family = recipe.train, recipe.model.resolved_family
    sizes = model_size(recipe, base_dir)
    sizes = replace(sizes, controlnet=FAMILIES[family].controlnet_params(recipe, sizes))
    half = (recipe.launch.mixed_precision or t.mixed_precision) != "no"
    frozen_bytes = 2 if half else 4  # frozen weights are stored in the autocast dtype
    # The ControlNet keeps fp32 master weights (4 bytes a parameter) and AdamW's two fp32 states (8), or
    # two 1-byte states with 8-bit AdamW (2); its gradients are fp32 (4).
    trained = lora_trainable(recipe, sizes) if t.lora is not None else sizes.controlnet
    controlnet = trained * (4 + (2 if t.optimizer == "adamw_8bit" else 8))
    if t.lora is not None:  # the frozen copy, in the compute precision
        controlnet += (sizes.controlnet - trained) * frozen_bytes
    if recipe.launch.total_processes > 1:
        controlnet += trained * 4  # DDP's gradient buckets hold a second copy of the grads
    if t.ema_decay is not None and not t.ema_offload:
        controlnet += trained * 4  # the fp32 average, resident on the accelerator
    gradients = trained * 4 / GIB
    # With precompute, latents and text embeddings are cached before training and the encoders leave the
    # accelerator; without it they stay resident (frozen, in the autocast dtype).
    encoders = 0.0 if recipe.precomputes else (sizes.vae + sizes.text_encoders) * frozen_bytes
    per_image = ACTIVATION_GB_PER_IMAGE_AT_512[family][(half, t.gradient_checkpointing)]
    act = per_image * FAMILIES[family].figures.activation_scale(recipe.dataset.resolution) * t.batch_size
    act *= min(1.0, sizes.unet / FAMILY_SIZES[family].unet)  # smaller (builtin, pruned) UNets, fewer
    if half:  # (a LoRA's frozen copy is stored half already: only its small trained part is cast)
        act += trained * 2 / GIB * CAST_COPIES_KEPT[t.gradient_checkpointing]
    held = t.gradient_accumulation_steps > 1 or not t.set_grads_to_none
    forward = act + (gradients if held else 0.0)
    backward = gradients + BACKWARD_ACTIVATION_SHARE * act
    if forward >= backward:
        grads_at_peak, act_at_peak = (gradients if held else 0.0), act
    else:
        grads_at_peak, act_at_peak = gradients, BACKWARD_ACTIVATION_SHARE * act
    # train.fp8_base: 1 byte a parameter for the family's fp8 share (what layerwise casting skips stays in
    # the compute dtype); the cast-up copy of the layer running is a temporary, within the traced
    # activations' margin.
    share = FAMILIES[family].figures.fp8_share if t.fp8_base else 0.0
    unet_bytes = share * 1 + (1 - share) * frozen_bytes
    return MemoryEstimate(
        sizes.unet * unet_bytes / GIB,
        controlnet / GIB,
        encoders / GIB,
        grads_at_peak,
        act_at_peak,
        OVERHEAD_GB,
        sizes,
        FAMILIES[recipe.model.resolved_family].denoiser_name,
    )


def _with_train(recipe: Recipe, update: dict) -> Recipe:
    """`recipe` with `train` fields replaced, and `model` ones under the key "model" (a mixed_precision
    change also clears launch's override)."""
    update = dict(update)
    model = recipe.model.model_copy(update=update.pop("model", {}))
    launch = recipe.launch
    if "mixed_precision" in update:
        launch = launch.model_copy(update={"mixed_precision": None})
    train = recipe.train.model_copy(update=update)
    return recipe.model_copy(update={"train": train, "launch": launch, "model": model})


def memory_savers(recipe: Recipe, base_dir: Path | None = None) -> tuple[list[str], Recipe]:
    """Options that would lower the estimate and are not in use yet, each with what it alone saves, and
    the recipe with all of them."""
    t = recipe.train
    refused = refused_options(recipe.model.resolved_family)
    found: list[tuple[str, dict]] = []
    totals: dict[str, float] = {}  # estimates already made for an option (its text): not made twice
    if not t.gradient_checkpointing:
        found.append(("train.gradient_checkpointing: true (≈ 30% slower)", {"gradient_checkpointing": True}))
    if t.optimizer == "adamw":
        found.append(("train.optimizer: adamw_8bit (bitsandbytes)", {"optimizer": "adamw_8bit"}))
    if (recipe.launch.mixed_precision or t.mixed_precision) == "no":
        found.append(("train.mixed_precision: fp16 (bf16 on Ampere or newer)", {"mixed_precision": "fp16"}))
    if t.batch_size > 1:
        acc = t.batch_size * t.gradient_accumulation_steps
        found.append(
            (
                f"train.batch_size: 1 with train.gradient_accumulation_steps: {acc} (same effective batch)",
                {"batch_size": 1, "gradient_accumulation_steps": acc},
            )
        )
    if not t.precompute and not recipe.dataset.source.streams:
        found.append(
            ("train.precompute: true (VAE and text encoders off the accelerator)", {"precompute": True})
        )
    if not t.fp8_base and not t.compile and "train.fp8_base" not in refused:  # (fp8 and compile do not mix)
        found.append(
            (
                f"train.fp8_base: true (the frozen {FAMILIES[recipe.model.resolved_family].denoiser_name} in "
                "fp8; a little speed and fidelity; needs gradient_checkpointing)",
                {"fp8_base": True},
            )
        )
    if t.lora is None and "train.lora" not in refused:
        from recipe_runner.recipe.train import LoraSpec

        lora = _with_train(recipe, {"lora": LoraSpec(rank=64)})
        estimate = estimate_memory(lora, base_dir)
        share = lora_trainable(lora, estimate.sizes) / estimate.sizes.controlnet
        text = (
            f"train.lora: {{rank: 64}} (a LoRA of the ControlNet: {share:.0%} of its weights train; "
            "usually a higher learning_rate)"
        )
        found.append((text, {"lora": LoraSpec(rank=64)}))
        totals[text] = estimate.total_gb
    if t.ema_decay is not None and not t.ema_offload:
        found.append(
            ("train.ema_offload: true (the EMA average in host memory between steps)", {"ema_offload": True})
        )
    family = FAMILIES[recipe.model.resolved_family]
    found += [(text, {"model": update}) for text, update in family.memory_savers(recipe)]
    if not found:
        return [], recipe
    now = estimate_memory(recipe, base_dir).total_gb
    outside = " and ".join(
        [
            *(
                f
                for f in ("train.fp8_base", "train.lora", "train.ema_offload")
                if any(f.split(".")[1] in u for _, u in found)
            ),
            *(f"model.{k}" for _, u in found for k in u.get("model", {})),
        ]
    )
    options = [f"extends: base/low-vram.yaml (all of the below{' but ' + outside if outside else ''})"]
    for text, update in found:
        if text not in totals:
            totals[text] = estimate_memory(_with_train(recipe, update), base_dir).total_gb
        saved = now - totals[text]
        options.append(f"{text}: −{saved:.1f} GB" if saved >= 0.05 else text)
    everything = {k: v for _, update in found for k, v in update.items()}
    return options, _with_train(recipe, everything)


# Training images/s on one A100-class GPU at 512 px with fp16/bf16 autocast, SDPA attention, precomputed
# latents and no checkpointing: rough figures from public diffusers ControlNet training logs (SD1.5 ≈ 8
# images/s); SDXL's ~3× bigger UNet ≈ 3 images/s at 512 px (≈ 0.75 at 1024 px).
IMAGES_PER_S_AT_512 = {n: f.figures.images_per_s_at_512 for n, f in FAMILIES.items()}
# Builtin models on a 2-core CPU (benchmarks/RESULTS.md, 2026-12-01): tiny-sd at 64 px batch 4 runs
# 28.1 steps/s, shapes-sd at batch 32 runs 4.95; a step costs ≈ 11 ms plus ≈ 6.1 ms per 64 px image.
CPU_STEP_OVERHEAD_S = 0.011
CPU_SECONDS_PER_IMAGE_64 = 0.0061
# shapes-sd3's MMDiT attends over 157 tokens a 64 px image (64 image + 16 CLIP + 77 zero T5 tokens): a
# step at batch 32 takes 2.06x shapes-sd's (60-step runs of the two demos, alone, in one session on
# 2026-12-06: 1.20 steps/s against 2.30 and 2.63), so ≈ 12.9 ms per 64 px image on the same overhead.
SHAPES_SD3_RATIO = 2.06
SHAPES_SD3_SECONDS = (
    SHAPES_SD3_RATIO * (CPU_STEP_OVERHEAD_S + 32 * CPU_SECONDS_PER_IMAGE_64) - CPU_STEP_OVERHEAD_S
) / 32
CPU_SECONDS_PER_IMAGE_64_BY_BUILTIN = {"shapes-sd3": SHAPES_SD3_SECONDS}


@dataclass(frozen=True)
class TimeEstimate:
    steps_per_s: float
    seconds: float | None  # None while the number of steps is unknown
    assumption: str

    def to_dict(self) -> dict:
        seconds = round(self.seconds) if self.seconds is not None else None
        return {"steps_per_s": round(self.steps_per_s, 3), "seconds": seconds, "assumption": self.assumption}


def estimate_time(recipe: Recipe, steps: int | None) -> TimeEstimate:
    """Training time (no dataset build, validation sampling or evaluation) from a throughput table."""
    t, family = recipe.train, recipe.model.resolved_family
    if recipe.model.base.startswith("builtin:"):
        images = t.batch_size * (recipe.dataset.resolution / 64) ** 2
        name = recipe.model.base.removeprefix("builtin:")
        per_image = CPU_SECONDS_PER_IMAGE_64_BY_BUILTIN.get(name, CPU_SECONDS_PER_IMAGE_64)
        per_micro = CPU_STEP_OVERHEAD_S + per_image * images
        rate = 1 / (per_micro * t.gradient_accumulation_steps)
        why = (
            f"builtin model on a 2-core CPU: ≈ 11 ms a step + {per_image * 1000:.1f} ms per 64 px image "
            "(measured)"
        )
    else:
        images = IMAGES_PER_S_AT_512[family] * (512 / recipe.dataset.resolution) ** 2
        if (recipe.launch.mixed_precision or t.mixed_precision) == "no":
            images /= 1.5 if t.allow_tf32 else 3.0  # fp32 runs at a fraction of tensor-core speed
        if t.gradient_checkpointing:
            images *= 0.75  # the recomputed forward pass
        if not recipe.precomputes:
            images *= 0.8  # VAE and text encoders run on every batch
        procs = recipe.launch.total_processes
        scaling = 0.9 if procs > 1 else 1.0  # gradient all-reduce
        rate = images * procs * scaling / (t.effective_batch * procs)
        why = (
            f"≈ {IMAGES_PER_S_AT_512[family]:g} images/s per A100-class GPU for {family} at 512 px in fp16 "
            "(scaled by resolution², precision, checkpointing and processes)"
        )
    return TimeEstimate(rate, steps / rate if steps is not None else None, why)


def format_duration(seconds: float) -> str:
    """`45 s`, `12 min`, `2 h 15 min`, `3 d 4 h`."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
