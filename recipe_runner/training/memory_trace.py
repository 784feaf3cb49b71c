"""Peak accelerator memory of a training step, traced on fake tensors: no GPU, no memory, seconds.

`recipe plan --trace` and `benchmarks/memory.py` run the real training step (the session's model setup,
`training.step`'s loss, backward, clipping, `features.make_optimizer`'s optimizer step, twice) under
torch's FakeTensorMode, where tensors have shapes, dtypes and strides but no storage, while a dispatch
mode adds up the bytes of every live storage: parameters, gradients, optimizer state, activations saved
for backward, temporaries. The models are diffusers' and transformers' own, built on the meta device from
the base model's configs (`load_components(weights=False)`) or from a full-size architecture
(`models/archs.py`).

What the figure is: what `torch.cuda.max_memory_allocated()` reports for the same step, less what only a
GPU allocates (cuDNN/cuBLAS workspaces, the allocator's rounding; typically a few hundred MB). The CUDA
context (~0.5 GB) is outside both. Emulated: CUDA autocast's policy of running group/layer norm and
softmax in fp32 (CPU autocast keeps them in half); attention runs as the CPU flash kernel, whose memory
is that of CUDA's flash and memory-efficient kernels (O(tokens), not O(tokens²)). Not traced: the fp16
GradScaler (in place, a few bytes) and DDP's gradient buckets (one more copy of the gradients).
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from recipe_runner.data.buckets import dataset_buckets
from recipe_runner.errors import UserError
from recipe_runner.families import FAMILIES, Components, family_of
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.training.lora import trainable

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages, their peak, and the peak of each named phase.

    A storage is counted once when an op first returns a tensor on it, and uncounted when it is freed
    (a weakref callback), which is what a caching allocator's "allocated" figure follows."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = self._phase_peak = 0
        self.phases: dict[str, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        size = storage.nbytes()

        def freed(_: object, key: int = key, size: int = size) -> None:
            self.current -= size
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)
        self._phase_peak = max(self._phase_peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, out)
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._phase_peak = self.current
        yield
        self.phases[name] = max(self.phases.get(name, 0), self._phase_peak)


@contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """CUDA autocast runs group/layer norm and softmax in fp32, CPU autocast in half: wrap them to cast
    their inputs up as CUDA's does, so the traced activations have the dtypes they have on a GPU.
    (Patched functions rather than a TorchFunctionMode: gradient checkpointing recomputes inside the
    backward pass, where function modes do not reach.)"""
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "softmax")}

    def fp32(fn):
        def wrapper(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return fn(*args, **kwargs)
            up = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map_only(torch.Tensor, up, (args, kwargs))
            with torch.autocast("cpu", enabled=False):
                return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(F, name, fp32(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


def _autocast_forward(forward, dtype: torch.dtype, cache: bool):
    """accelerate's mixed-precision wrapper: forward under autocast, outputs converted to fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype, cache_enabled=cache):
            return forward(*args, **kwargs)

    return convert_outputs_to_fp32(autocast_forward)


def _to_fake(module: torch.nn.Module, fake_mode) -> None:
    """Replace a meta module's parameters and buffers by fake CPU tensors of the same shape and dtype
    (`module.to()` cannot: it swaps tensors, which fake ones refuse)."""
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            with fake_mode:
                done[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return done[id(t)]

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b)


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (bitsandbytes shares its quantisation maps)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def arch_components(loaded: LoadedRecipe, arch: str, folder: Path) -> Components:
    """A full-size architecture of `models/archs.py` on the meta device, with the recipe's ControlNet
    (the tokenizers are the package's tiny offline one: the same 77-token window)."""
    from recipe_runner.models.archs import ARCHS, random_models, random_scheduler

    with torch.device("meta"):
        tokenizers, encoders, denoiser, vae = random_models(arch, folder)
    family = FAMILIES[ARCHS[arch].family]
    c = Components(family, tokenizers, encoders, vae, random_scheduler(arch), denoiser)
    if "joint_attention_dim" in denoiser.config:  # the flow families' text width (T5's)
        c.extra["joint_attention_dim"] = denoiser.config.joint_attention_dim
    c.controlnet = family.load_controlnet(loaded, c, weights=False)
    return c


def recipe_components(loaded: LoadedRecipe, folder: Path) -> tuple[Components, str]:
    """The recipe's own models on the meta device, from their configs (no weights read), and where the
    configs came from. A builtin base is built into `folder`; a hub id whose configs cannot be read
    (offline and not downloaded) falls back to its family's full-size architecture, and says so."""
    from recipe_runner.families.loading import load_components, resolve_base

    base = resolve_base(loaded, folder)
    try:
        return load_components(loaded, base, weights=False), f"the configs of {loaded.recipe.model.base}"
    except UserError as error:
        arch = family_of(loaded.recipe).offline_arch
        if Path(base).is_dir() or arch is None:  # a local folder's own error; no offline architecture
            raise
        return arch_components(loaded, arch, folder), (
            f"the {arch} architecture (models/archs.py): {loaded.recipe.model.base}'s configs could not be "
            f"read: {error.message.split(': ', 1)[-1]}"
        )


def trace(
    loaded: LoadedRecipe,
    c: Components,
    autocast_cache: bool | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """Trace two optimizer steps (two micro-steps each when accumulating) of `loaded`'s recipe on the
    meta-device models `c` (which it takes over), with autocast's weight cache as the session sets it
    (or as `autocast_cache` says). Figures in GiB."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from recipe_runner.training import features
    from recipe_runner.training.encoding import place_encoders
    from recipe_runner.training.session import place_models
    from recipe_runner.training.step import StepInputs, controlnet_loss, draw, inputs_by_encoding

    recipe = loaded.recipe
    train = recipe.train
    dtype = features.weight_dtype(recipe)
    autocast_cache = features.AUTOCAST_CACHE if autocast_cache is None else autocast_cache
    if train.attention == "xformers":  # needs CUDA; its memory is that of SDPA's kernels
        setup = recipe.model_copy(update={"train": train.model_copy(update={"attention": "sdpa"})})
    else:
        setup = recipe
    controlnet = place_models(setup, c, "meta", dtype)
    if dtype != torch.float32:  # what accelerator.prepare does to the ControlNet (the UNet runs in half)
        controlnet.forward = _autocast_forward(controlnet.forward, dtype, autocast_cache)
    on_device = [c.unet, controlnet]
    if not recipe.precomputes:  # reference mode: the encoders stay on the accelerator
        place_encoders(c, recipe, "meta", dtype)
        on_device += [c.vae, *c.text_encoders]

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    for model in on_device:
        _to_fake(model, fake_mode)
    live = LiveBytes()
    frozen = _nbytes(t for m in on_device if m is not controlnet for t in [*m.parameters(), *m.buffers()])
    controlnet_bytes = _nbytes([*controlnet.parameters(), *controlnet.buffers()])
    for model in on_device:
        for t in [*model.parameters(), *model.buffers()]:
            live.add(t)
    with unset_fake_temporarily():  # bitsandbytes builds its quantisation maps with real tensors
        optimizer = features.make_optimizer(recipe, trainable(controlnet), train.learning_rate)
    ema = None
    if train.ema_decay is not None and not train.ema_offload:  # the fp32 average stays beside the weights
        with fake_mode:
            ema = [p.detach().clone() for p in trainable(controlnet)]
        for t in ema:
            live.add(t)
    ema_bytes = _nbytes(ema or [])

    b, res = train.batch_size, recipe.dataset.resolution
    width, height = size or (res, res)  # (width, height): an aspect-ratio bucket's, or the square
    shape = c.latent_shape(height, width)
    tokens, text_width, pooled = c.family.text_shape(c)
    micro_steps = min(train.gradient_accumulation_steps, 2)
    timesteps = c.noise_scheduler.config.num_train_timesteps
    with fake_mode, live, cuda_autocast_policy():
        for step in range(2):
            for micro in range(micro_steps):
                with unset_fake_temporarily():
                    draws = draw(
                        recipe.seed,
                        step * micro_steps + micro,
                        list(range(b)),
                        shape,
                        timesteps,
                        0.0,
                        sample_timestep=c.family.timestep_sampler(recipe, timesteps),
                    )
                cond = torch.zeros(b, recipe.model.conditioning_channels, height, width)
                with live.phase("inputs"):
                    if recipe.precomputes:
                        inputs = StepInputs(
                            torch.zeros(b, *shape, dtype=dtype),
                            torch.zeros(b, *shape, dtype=dtype),
                            torch.zeros(b, tokens, text_width, dtype=dtype),
                            torch.zeros(b, pooled, dtype=dtype) if pooled else None,
                            cond,
                            torch.zeros(b, *shape, dtype=dtype) if c.family.latent_control else None,
                        )
                    else:
                        batch = {
                            "pixels": torch.zeros(b, 3, height, width),
                            "prompt": ["a"] * b,
                            "conditioning": cond,
                        }
                        inputs = inputs_by_encoding(c, batch, draws, torch.device("cpu"), dtype)
                with live.phase("forward"):
                    loss = controlnet_loss(c, controlnet, inputs, draws, recipe, dtype)
                with live.phase("backward"):
                    loss.backward()
                    del loss, inputs
            with live.phase("optimizer"):
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(controlnet.parameters(), train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=train.set_grads_to_none)
                if train.ema_decay is not None:  # training/ema.py: after the gradients are freed
                    params = [p.detach() for p in trainable(controlnet)]
                    # Offloaded, the average comes to the accelerator for the update only.
                    average = ema if ema is not None else [p.clone() for p in params]
                    torch._foreach_lerp_(average, params, 0.01)
                    del average, params
    state = _nbytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "peak_gb": live.peak / GIB,
        "peak_phase": max(live.phases, key=live.phases.__getitem__),
        "phases_gb": {k: v / GIB for k, v in live.phases.items()},
        "frozen_weights_gb": frozen / GIB,
        "controlnet_weights_gb": controlnet_bytes / GIB,
        "optimizer_state_gb": state / GIB,
        "ema_gb": ema_bytes / GIB,
        # The rest of the peak: gradients (fp32, the ControlNet's size, when held), activations saved
        # for backward, and the temporaries of the op running at that moment.
        "gradients_activations_temporaries_gb": (live.peak - frozen - controlnet_bytes - state - ema_bytes)
        / GIB,
    }


def trace_recipe(loaded: LoadedRecipe) -> dict:
    """`recipe plan --trace`: the recipe's own training step traced, with what it was traced on."""
    import importlib.util

    if loaded.recipe.train.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "recipe plan --trace: train.optimizer adamw_8bit is traced with bitsandbytes' own optimizer, "
            "which is not installed",
            hint="pip install 'recipe-runner[bnb]', or leave out --trace for the estimate",
        )
    from recipe_runner.runfolder.log import quiet_libraries

    quiet_libraries()  # no save/load progress bars from building a builtin base
    # With buckets, the square and the most elongated bucket: the two ends of the activations' shapes
    # (all hold at most resolution² pixels). Each trace fakes its models, so each gets its own.
    buckets = dataset_buckets(loaded.recipe.dataset)
    sizes = [None, buckets[-1]] if buckets else [None]
    traces = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="recipe-trace-") as tmp:
            components, source = recipe_components(loaded, Path(tmp))
            traced = trace(loaded, components, size=size)
            res = loaded.recipe.dataset.resolution
            w, h = size or (res, res)
            traces.append({**traced, "models": source, "size": f"{w}x{h}"})
    return max(traces, key=lambda t: t["peak_gb"])
