"""Optional integrations (bitsandbytes, xformers, wandb) and hardware switches, one seam each.

Everything a recipe asks for that this machine cannot do is found by `check_environment` before any
model is loaded, so a user waits seconds, not minutes, for the message.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterable

import torch

from recipe_runner.errors import UserError
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.training.keys import effective_precision


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _bnb_runs_on_cpu() -> bool:
    """bitsandbytes >= 0.50 registers CPU kernels for its 8-bit optimizers; older ones are CUDA only."""
    importlib.import_module("bitsandbytes")  # registers its operators (warning: see recipe_runner/__init__)
    op = "bitsandbytes::optimizer_update_8bit_blockwise"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    except RuntimeError:  # no such operator: a bitsandbytes from before the torch.library ops
        return False


def check_environment(recipe: Recipe) -> None:
    """Raise UserError for optional packages or hardware the recipe needs but this machine lacks."""
    train = recipe.train
    cuda = torch.cuda.is_available()
    if train.optimizer == "adamw_8bit":
        if not _installed("bitsandbytes"):
            raise UserError(
                "train.optimizer: adamw_8bit needs the bitsandbytes package, which is not installed",
                hint="pip install 'recipe-runner[bnb]', or set train.optimizer: adamw",
            )
        if not cuda and not _bnb_runs_on_cpu():
            version = importlib.metadata.version("bitsandbytes")
            raise UserError(
                f"train.optimizer: adamw_8bit: bitsandbytes {version} has no CPU kernel "
                "for 8-bit AdamW, and no CUDA GPU is available",
                hint="pip install 'bitsandbytes>=0.50' (CPU optimizers), or set train.optimizer: adamw",
            )
    if train.lora is not None:
        from recipe_runner.training.lora import require_peft

        require_peft()
    if train.attention == "xformers":
        if not _installed("xformers"):
            raise UserError(
                "train.attention: xformers needs the xformers package, which is not installed",
                hint="pip install 'recipe-runner[xformers]', or set train.attention: sdpa",
            )
        if not cuda:
            raise UserError(
                "train.attention: xformers needs a CUDA GPU", hint="set train.attention: sdpa on this machine"
            )
    if train.fp8_base and not cuda and torch.backends.mps.is_available():
        raise UserError(
            "train.fp8_base: Apple's MPS backend has no float8 tensors",
            hint="set train.fp8_base: false on this machine",
        )
    precision = effective_precision(recipe)
    if precision == "fp16" and not cuda:
        raise UserError(
            "mixed_precision: fp16 needs a CUDA GPU, and none is available",
            hint="set train.mixed_precision: bf16 or no on this machine",
        )
    if recipe.logging.tracker == "wandb" and not _installed("wandb"):
        raise UserError(
            "logging.tracker: wandb needs the wandb package, which is not installed",
            hint="pip install 'recipe-runner[wandb]', or set logging.tracker: tensorboard",
        )
    if recipe.logging.tracker == "tensorboard" and not (
        _installed("tensorboard") or _installed("tensorboardX")
    ):
        raise UserError(
            "logging.tracker: tensorboard needs the tensorboard package, which is not installed",
            hint="pip install tensorboard, or set logging.tracker: none",
        )


def set_threads(recipe: Recipe) -> int:
    """torch's intra-op threads for this process: `train.threads`, else OMP_NUM_THREADS when set, else
    the cores it may use over the recipe's processes on this machine (each of N gloo processes with all
    the cores oversubscribes them N times). Returns the count."""
    threads = recipe.train.threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // recipe.launch.num_processes)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# autocast keeps the half-precision copy of each fp32 weight it casts until the forward pass ends, for
# reuse. A ControlNet uses each weight once per forward, so the cache saves no cast; with gradient
# checkpointing it is the only thing holding the copies, 0.37 GiB of SD 1.5's low-VRAM peak
# (benchmarks/memory.py). Off, they are freed block by block.
AUTOCAST_CACHE = False


def weight_dtype(recipe: Recipe) -> torch.dtype:
    """Dtype of the frozen weights (the ControlNet's master weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(effective_precision(recipe), torch.float32)


def make_optimizer(recipe: Recipe, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    train = recipe.train
    settings = {
        "lr": lr,
        "betas": (train.adam_beta1, train.adam_beta2),
        "weight_decay": train.adam_weight_decay,
        "eps": train.adam_epsilon,
    }
    if train.optimizer == "adamw_8bit":
        bnb = importlib.import_module("bitsandbytes")
        return bnb.optim.AdamW8bit(params, **settings)
    params = list(params)
    if train.fused_optimizer:
        # torch's default AdamW applies the update tensor by tensor (~200 of them in a ControlNet, one
        # kernel each on the CPU); the fused kernel does them all at once. GradScaler (fp16) supports it.
        try:
            return torch.optim.AdamW(params, **settings, fused=True)
        except RuntimeError as e:  # a device without the fused kernel (torch names those it has)
            logging.getLogger("recipe_runner").warning("fused AdamW unavailable (%s); using the default", e)
    return torch.optim.AdamW(params, **settings)


def set_attention(recipe: Recipe, *models: torch.nn.Module) -> None:
    """diffusers uses SDPA by default on PyTorch 2; only the other two need work."""
    attention = recipe.train.attention
    for model in models:
        if attention == "xformers":
            model.enable_xformers_memory_efficient_attention()
        elif attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            model.set_attn_processor(AttnProcessor())


def allow_tf32(enabled: bool) -> None:
    if not enabled or not torch.cuda.is_available():
        return
    # PyTorch >= 2.9 has the fp32_precision switches; the old flags still work but warn.
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def tracker_name(recipe: Recipe) -> str | None:
    tracker = recipe.logging.tracker
    return None if tracker == "none" else tracker
