"""The `recipe` process itself: optional packages it will not use kept out of it, and a quick exit.

Both only for a process the command line started. In-process callers (tests, notebooks) keep every
package and their interpreter's normal exit.

Measured on the 2-core CPU (importing what a training run imports, then exiting; benchmarks/RESULTS.md):
- diffusers imports torch._dynamo, which imports triton (100 MiB, 0.6 s) for GPU kernels, and peft
  imports bitsandbytes, which imports torch._inductor (1-1.5 s). A CPU run without torch.compile uses
  neither, and a recipe without 8-bit AdamW never calls bitsandbytes.
- Python's own teardown of torch's CUDA build took 1.4-1.7 s and touched 184 MiB more than the run's
  peak, every run, after everything was written.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from recipe_runner.recipe.recipe import Recipe

_command_line = False  # set by run_and_exit: this process is `recipe ...` or `python -m recipe_runner ...`

# Device nodes of NVIDIA's and AMD's drivers: where they exist, triton may compile GPU kernels.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def unused_packages(recipe: Recipe | None, *, gpu_nodes: tuple[str, ...] = GPU_DEVICE_NODES) -> list[str]:
    """The optional packages a run of `recipe` (None: sampling only) never calls, though the libraries
    import them when they are installed."""
    unused = []
    if recipe is None or recipe.train.optimizer != "adamw_8bit":
        unused.append("bitsandbytes")
    # triton: torch.compile's GPU code generator (the CPU's is C++), also used by xformers' kernels
    gpu = any(Path(node).exists() for node in gpu_nodes)
    if not gpu and (recipe is None or (not recipe.train.compile and recipe.train.attention != "xformers")):
        unused.append("triton")
    return unused


def keep_out(recipe: Recipe | None) -> None:
    """In a process the command line started, before torch is imported: make `import NAME` fail for
    each of `unused_packages`, as if it were not installed.

    The libraries import these inside `try: ... except ImportError` (peft, torch._dynamo) or check them
    with importlib.util.find_spec (diffusers, peft), which then answers None."""
    if not _command_line or "torch" in sys.modules:
        return
    packages = unused_packages(recipe)
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
    global _command_line
    _command_line = True
    try:
        app()
        code = 0
    except SystemExit as e:
        if "torch" not in sys.modules or not (e.code is None or isinstance(e.code, int)):
            raise  # a light command, or an exit with a message: Python's own exit
        code = e.code or 0
    if "torch" in sys.modules:
        _exit_now(code)


def _exit_now(code: int) -> None:
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; absent elsewhere
    if run_exit_handlers is None:
        sys.exit(code)
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
