"""The `recipe` process itself: optional packages it will not use kept out of it, how busy the machine
was as it started, its allocator's settings, and a quick exit.

Keeping packages out and the quick exit apply only to a process the command line started. In-process
callers (tests, notebooks) keep every package and their interpreter's normal exit.

Measured on the 2-core CPU (importing what a training run imports, then exiting; benchmarks/RESULTS.md):
- diffusers imports torch._dynamo, which imports triton (100 MiB, 0.6 s) for GPU kernels, and peft
  (0.3-0.5 s), which imports bitsandbytes, which imports torch._inductor (1-1.5 s). A CPU run without
  torch.compile uses no triton, a recipe without 8-bit AdamW never calls bitsandbytes, one without
  train.lora never calls peft.
- torch.cuda imports cuda-python's driver and runtime bindings when installed (15 MiB, unused without a
  GPU).
- diffusers' schedulers import scipy.stats (60 MiB, 0.3 s), for beta sigmas only, and transformers'
  image utilities import torchvision (57 MiB), which controlnet_aux's annotators need, not training.
- glibc's allocator handed each batch's freed activations back to the kernel and faulted them in again
  (malloc.py).
- Python's own teardown of torch's CUDA build took 1.4-1.7 s and touched 184 MiB more than the run's
  peak, every run, after everything was written.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe_runner.malloc import keep_freed_memory
from recipe_runner.recipe.checks import looks_local
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe

_command_line = False  # set by run_and_exit: this process is `recipe ...` or `python -m recipe_runner ...`
_cpu_at_start: tuple[float, float, float] | None = None  # _cpu_now() as run_and_exit began

# Device nodes of NVIDIA's and AMD's drivers (and WSL's): where they exist, triton may compile GPU kernels
# and torch may call the CUDA driver through cuda-python.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


# Conditions made (conditions/simple.py) and scored (evaluate/metrics.py) with OpenCV and NumPy alone. The
# others may call scipy and torchvision: controlnet_aux's annotators do, and scikit-image's SSIM, evaluate's
# score for the conditions without a metric of their own, calls scipy.
OPENCV_CONDITIONS = frozenset({"canny", "scribble", "color_palette"})


def unused_packages(
    recipe: Recipe | None,
    *,
    gpu_nodes: tuple[str, ...] = GPU_DEVICE_NODES,
    scheduler: dict[str, Any] | None = None,
) -> list[str]:
    """The optional packages a run of `recipe` (None: sampling only) never calls, though the libraries
    import them when they are installed. `scheduler`: the base's scheduler config (None: unknown)."""
    unused = []
    if recipe is None or recipe.train.optimizer != "adamw_8bit":
        unused.append("bitsandbytes")
    if recipe is not None and recipe.train.lora is None:  # diffusers imports it for adapters we never load
        unused.append("peft")
    # triton: torch.compile's GPU code generator (the CPU's is C++), also used by xformers' kernels
    gpu = any(Path(node).exists() for node in gpu_nodes)
    if not gpu and (recipe is None or (not recipe.train.compile and recipe.train.attention != "xformers")):
        unused.append("triton")
    if not gpu:  # cuda-python: torch.cuda imports its driver bindings (15 MiB) in case it has a GPU to call
        unused.append("cuda.bindings")
    opencv_only = recipe is not None and recipe.condition.type in OPENCV_CONDITIONS
    # scipy: diffusers' schedulers call it only for beta sigmas, which the base's scheduler config sets
    if opencv_only and scheduler is not None and not scheduler.get("use_beta_sigmas"):
        unused.append("scipy")
    if opencv_only:  # diffusers and transformers use torchvision only for models and pipelines we never load
        unused.append("torchvision")
    return unused


def scheduler_config(loaded: LoadedRecipe) -> dict[str, Any] | None:
    """The base model's scheduler config, if it can be read without loading anything or going online:
    a local folder's, a hub model's already in the hub cache, a builtin's (none sets beta sigmas)."""
    spec = loaded.recipe.model
    if spec.base.startswith("builtin:"):
        return {}
    name = "scheduler/scheduler_config.json"
    local = loaded.resolve(spec.base)
    if looks_local(spec.base) or local.is_dir():
        found: object = local / name
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.base, name, revision=spec.revision)
    try:
        config = (
            json.loads(Path(found).read_text(encoding="utf-8")) if isinstance(found, (str, Path)) else None
        )
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def keep_out(loaded: LoadedRecipe | None) -> None:
    """In a process the command line started, before torch is imported: make `import NAME` fail for
    each of `unused_packages` of `loaded`'s recipe (None: sampling only), as if it were not installed.

    The libraries import these inside `try: ... except ImportError` (peft, torch._dynamo, diffusers'
    schedulers) or check them with importlib.util.find_spec (diffusers, peft), which then answers None."""
    if not _command_line or "torch" in sys.modules:
        return
    if loaded is None:
        packages = unused_packages(None)
    else:
        packages = unused_packages(loaded.recipe, scheduler=scheduler_config(loaded))
    for name in packages:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  (None in sys.modules: "not installed")
    if "triton" in packages:  # torch warns once, at import, that it cannot count triton kernels' FLOPs
        logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)


def run_and_exit(app: Callable[[], object]) -> None:
    """Run the command line; once torch is loaded, end the process without Python's teardown.

    What a normal exit does that matters still happens, in its order: non-daemon threads are joined,
    then every exit handler runs (logging's, and those of whatever started us: coverage, profilers,
    benchmarks/step_clock.py), then the output is flushed. What is skipped is freeing each module and
    object one by one, which the operating system does at once."""
    global _command_line, _cpu_at_start
    _command_line = True
    _cpu_at_start = _cpu_now()
    keep_freed_memory()
    try:
        app()
        code = 0
    except SystemExit as e:
        if "torch" not in sys.modules or not (e.code is None or isinstance(e.code, int)):
            raise  # a light command, or an exit with a message: Python's own exit
        code = e.code or 0
    if "torch" in sys.modules:
        _exit_now(code)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) since it started."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def _cpu_now() -> tuple[float, float, float]:
    """(monotonic time, busy_cpu_seconds(), CPU seconds of this process)."""
    own = os.times()
    return time.monotonic(), busy_cpu_seconds(), own.user + own.system


def others_cpu_percent(least_s: float = 0.2) -> float:
    """The share of the machine's CPU time (percent) that other processes used since the command line
    started, over `least_s` seconds at least (waiting for the rest).

    Sampled from the start, while the recipe loads, and not over a pause of its own (0.2 s of every run
    before): this process's own CPU time is left out of the machine's."""
    import psutil

    start = _cpu_at_start or _cpu_now()
    waited = time.monotonic() - start[0]
    if waited < least_s:
        time.sleep(least_s - waited)
    end = _cpu_now()
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, 100.0 * others / ((end[0] - start[0]) * (psutil.cpu_count() or 1)))


def _exit_now(code: int) -> None:
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; absent elsewhere
    if run_exit_handlers is None:
        sys.exit(code)
    # What the interpreter does first at exit: threading's own exit callbacks (they stop the idle workers
    # of thread pools nobody shut down, which would otherwise wait forever), then join non-daemon threads.
    shutdown_threads = getattr(threading, "_shutdown", None)  # CPython's
    if shutdown_threads is not None:
        shutdown_threads()
    else:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(code)
