"""Everything a training run holds while it steps: accelerator, models, optimizer, data, cache.

`open_session` does the setup of diffusers' train_controlnet.py in the same order: accelerator, frozen
base in the half dtype, ControlNet in fp32, optimizer, lr schedule, accelerator.prepare.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
)
from datasets import DatasetDict
from diffusers.optimization import get_scheduler
from rich.console import Console

from recipe_runner.families import Components, family_of
from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.malloc import release_freed_memory
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.training import features
from recipe_runner.training.data import BatchPlan, batch_plan, load_rows
from recipe_runner.training.ema import ControlNetEMA, make_ema
from recipe_runner.training.encoding import move, place_encoders, warn_overlong
from recipe_runner.training.keys import built_dataset_fingerprint, effective_precision, resume_fields
from recipe_runner.training.lora import trainable
from recipe_runner.training.precompute import EncodedCache, Shard, build_cache, precompute_key


@dataclass
class Session:
    loaded: LoadedRecipe
    folder: RunFolder
    accelerator: Accelerator
    components: Components
    controlnet: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    data: DatasetDict
    plan: BatchPlan | None  # None for a streaming source: `stream` gives the rows
    cache: EncodedCache | None
    weight_dtype: torch.dtype
    max_steps: int
    learning_rate: float
    console: Console | None
    ema: ControlNetEMA | None = None  # train.ema_decay's average of the ControlNet's weights
    precompute_seconds: float | None = None  # opening (or building) the precompute cache
    eval_condition: Any = None  # the condition evaluate.at_validation re-extracts with, set up once
    stream: Any = None  # data/stream.py's StreamRows: this process's share of a streaming source

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    @contextlib.contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """With a precompute cache the VAE and text encoders wait on the CPU; validation borrows them."""
        if self.cache is None or self.device.type == "cpu":
            yield
            return
        place_encoders(self.components, self.recipe, self.device, self.weight_dtype)
        try:
            yield
        finally:
            place_encoders(self.components, self.recipe, "cpu", self.weight_dtype)
            torch.cuda.empty_cache()


def make_accelerator(loaded: LoadedRecipe, folder: RunFolder) -> Accelerator:
    recipe = loaded.recipe
    # accelerate keeps precision and accumulation settings in process-wide singletons; a second run in
    # the same process (tests, the benchmark, a notebook) must not inherit the first one's. The
    # process-group state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Accumulation runs over one stream of micro-batches (not reset at epoch ends), so that a resumed
    # run's group boundaries are those of an uninterrupted one: micro-step = optimizer step x steps.
    plugin = GradientAccumulationPlugin(
        num_steps=recipe.train.gradient_accumulation_steps, sync_with_dataloader=False
    )
    return Accelerator(
        gradient_accumulation_plugin=plugin,
        mixed_precision=effective_precision(recipe),
        log_with=features.tracker_name(recipe),
        project_config=ProjectConfiguration(project_dir=str(folder.root), logging_dir=str(folder.logs)),
        dynamo_backend="inductor" if recipe.train.compile else "no",
        kwargs_handlers=[
            AutocastKwargs(cache_enabled=features.AUTOCAST_CACHE),
            # Several processes: DDP waits for every parameter's gradient unless told some get none.
            DistributedDataParallelKwargs(find_unused_parameters=family_of(recipe).unused_parameters),
        ],
    )


def _shard(accelerator: Accelerator) -> Shard:
    def share(value):
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    return Shard(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, share)


def cache_folder(loaded: LoadedRecipe, folder: RunFolder, base: str, dtype: torch.dtype) -> Path:
    key = precompute_key(loaded.recipe, base, built_dataset_fingerprint(folder.dataset), dtype)
    return folder.cache / key


def ensure_cache(
    loaded: LoadedRecipe,
    folder: RunFolder,
    c: Components,
    base: str,
    rows,
    device: torch.device | str,
    dtype: torch.dtype,
    console: Console | None,
    shard: Shard | None = None,
    needed: list[int] | None = None,
) -> EncodedCache:
    """Open the precompute cache for these inputs, computing what it lacks of the rows `needed` (None:
    every row) with the encoders on `device`; with a `shard`, together with the other processes of the
    launch (every one calls this)."""
    path = cache_folder(loaded, folder, base, dtype)
    cached = EncodedCache.open(path)
    if shard is None and cached is not None and cached.holds(len(rows), needed):
        return cached
    place_encoders(c, loaded.recipe, device, dtype)
    try:
        return build_cache(c, loaded.recipe, rows, path, dtype, console, shard, needed)
    finally:
        place_encoders(c, loaded.recipe, "cpu", dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        release_freed_memory()


def place_models(
    recipe: Recipe, c: Components, device: torch.device | str, dtype: torch.dtype
) -> torch.nn.Module:
    """The frozen UNet in `dtype` and the ControlNet in fp32 on `device` (with `train.lora`, its LoRA),
    with the recipe's gradient checkpointing, attention, fp8 storage and memory format; returns the
    ControlNet (the memory tracer, training/memory_trace.py, traces this same setup)."""
    train = recipe.train
    assert c.unet is not None and c.controlnet is not None
    move(c.unet.requires_grad_(False), device, dtype)
    if train.fp8_base:  # weights stored in fp8, each layer cast up to `dtype` while it runs
        from recipe_runner.training.fp8 import store_in_fp8

        store_in_fp8(c.unet, dtype)
    controlnet = c.controlnet.to(device)  # fp32 master weights; autocast gives the speed
    if train.lora is not None:  # frozen in `dtype`, fp32 LoRA layers and ControlNet additions
        from recipe_runner.training.lora import add_lora

        add_lora(controlnet, train.lora, dtype)
    controlnet.train()
    if train.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        c.unet.enable_gradient_checkpointing()
    features.set_attention(recipe, c.unet, controlnet)
    if train.channels_last:
        c.unet.to(memory_format=torch.channels_last)
        controlnet.to(memory_format=torch.channels_last)
    return controlnet


def open_session(
    loaded: LoadedRecipe, folder: RunFolder, console: Console | None, *, base: str | None = None
) -> Session:
    recipe, train = loaded.recipe, loaded.recipe.train
    features.check_environment(recipe)
    accelerator = make_accelerator(loaded, folder)
    console = console if accelerator.is_main_process else None
    features.allow_tf32(train.allow_tf32)
    features.set_threads(recipe)
    dtype = features.weight_dtype(recipe)
    device = accelerator.device

    with accelerator.main_process_first():  # builtin models are built once
        data = load_rows(folder.dataset_data, recipe)
        base = base or resolve_base(loaded, folder.models_cache)
        c = load_components(loaded, base)
        c.family.check_scheduler(recipe, c)
    processes = accelerator.num_processes
    plan, stream, max_steps = None, None, train.max_steps
    if not recipe.dataset.source.streams:
        plan = batch_plan(recipe, data["train"], processes, accelerator.process_index)
        max_steps = train.max_steps or math.ceil(
            train.num_epochs * plan.batches_per_epoch / train.gradient_accumulation_steps
        )
    cache, precompute_seconds = None, None
    if recipe.precomputes:  # several processes: each encodes its share of the rows on its own device
        assert plan is not None and max_steps is not None
        shard = _shard(accelerator) if processes > 1 else None
        needed = plan.rows_drawn(max_steps * train.gradient_accumulation_steps)
        started = time.perf_counter()
        cache = ensure_cache(loaded, folder, c, base, data["train"], device, dtype, console, shard, needed)
        precompute_seconds = round(time.perf_counter() - started, 3)
        place_encoders(c, recipe, "cpu", dtype)
    else:  # reference mode: prompts are encoded (and truncated) at each step
        place_encoders(c, recipe, device, dtype)
        if accelerator.is_main_process:
            rows = data["preview" if recipe.dataset.source.streams else "train"]  # a stream: its first rows
            warn_overlong(c, list(dict.fromkeys(rows["prompt"])), console)

    controlnet = place_models(recipe, c, device, dtype)
    if train.compile:
        c.unet = torch.compile(c.unet)

    lr = train.learning_rate
    if train.scale_lr:
        lr *= train.gradient_accumulation_steps * train.batch_size * processes
    optimizer = features.make_optimizer(recipe, trainable(controlnet), lr)
    if recipe.dataset.source.streams:  # validation requires max_steps: a stream's length is unknown
        from recipe_runner.data.stream import StreamRows

        held = frozenset(held_out_rows(folder))
        stream = StreamRows(loaded, accelerator.process_index, processes, exclude=held)
    # Like the reference: the prepared scheduler steps once per process per optimizer step.
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps * processes,
        num_training_steps=max_steps * processes,
        num_cycles=train.lr_num_cycles,
        power=train.lr_power,
    )
    ema = make_ema(recipe, controlnet)  # of the fp32 master weights, before DDP wraps them
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved and resumed with the checkpoints
    return Session(
        loaded=loaded,
        folder=folder,
        accelerator=accelerator,
        components=c,
        controlnet=controlnet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        data=data,
        plan=plan,
        cache=cache,
        weight_dtype=dtype,
        max_steps=max_steps,
        learning_rate=lr,
        console=console,
        ema=ema,
        precompute_seconds=precompute_seconds,
        stream=stream,
    )


def held_out_rows(folder: RunFolder) -> list[str]:
    """The rows of a streaming source that the dataset stage held out (report.json), which training skips."""
    try:
        return list(json.loads((folder.dataset / "report.json").read_text()).get("holdout_ids") or [])
    except (OSError, ValueError):
        return []


def tracker_config(loaded: LoadedRecipe) -> dict:
    """Flat scalars for the tracker's hyperparameter table (TensorBoard accepts no lists or None)."""
    fields = resume_fields(loaded.recipe)
    fields["train.max_steps"] = loaded.recipe.train.max_steps
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in fields.items()}


def training_paths(folder: RunFolder) -> dict[str, str]:
    return {
        name: str(path)
        for name, path in {
            "controlnet": folder.controlnet,
            "samples": folder.samples,
            "checkpoints": folder.checkpoints,
            "logs": folder.logs,
            "model_card": folder.model_card,
        }.items()
    }


def peak_accelerator_memory_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
