"""The `recipe` process: optional packages a run will not use are kept out, and it exits without
Python's teardown, running every exit handler first (cli/process.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from recipe_runner.cli import process
from recipe_runner.recipe.loader import LoadedRecipe, load_recipe
from recipe_runner.recipe.recipe import Recipe
from tests.conftest import MINIMAL


def _recipe(condition: str = "canny", **train: object) -> Recipe:
    data = yaml.safe_load(MINIMAL)
    data["train"].update(train)
    data["condition"] = {"type": condition}
    return Recipe.model_validate(data)


def _loaded(tmp_path: Path, base: str) -> LoadedRecipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL.replace("builtin:tiny-sd", base), encoding="utf-8")
    return load_recipe(path)


def test_unused_packages_follow_the_recipe_and_the_machine(tmp_path: Path) -> None:
    none: tuple[str, ...] = ()
    depth = "depth"  # a condition that may need scipy and torchvision: neither is kept out
    lora = {"rank": 4}
    cpu = "cuda.bindings"  # torch.cuda's driver bindings: kept out wherever there is no GPU
    assert process.unused_packages(_recipe(depth, lora=lora), gpu_nodes=none) == [
        "bitsandbytes",
        "triton",
        cpu,
    ]
    assert process.unused_packages(_recipe(depth), gpu_nodes=none) == ["bitsandbytes", "peft", "triton", cpu]
    assert process.unused_packages(_recipe(depth, optimizer="adamw_8bit", lora=lora), gpu_nodes=none) == [
        "triton",
        cpu,
    ]
    assert process.unused_packages(_recipe(depth, compile=True, lora=lora), gpu_nodes=none) == [
        "bitsandbytes",
        cpu,
    ]
    node = tmp_path / "nvidiactl"
    node.touch()
    assert process.unused_packages(_recipe(depth, lora=lora), gpu_nodes=(str(node),)) == ["bitsandbytes"]
    assert process.unused_packages(None, gpu_nodes=none) == ["bitsandbytes", "triton", cpu]  # sampling


def test_scipy_and_torchvision_are_kept_out_only_where_nothing_can_call_them() -> None:
    none: tuple[str, ...] = ()
    unused = lambda recipe, scheduler: process.unused_packages(recipe, gpu_nodes=none, scheduler=scheduler)  # noqa: E731
    assert "scipy" in unused(_recipe("canny"), {"_class_name": "DDPMScheduler"})
    assert "scipy" in unused(_recipe("color_palette"), {})
    assert "scipy" not in unused(_recipe("openpose"), {})  # controlnet_aux's openpose calls scipy
    assert "scipy" not in unused(_recipe("shuffle"), {})  # evaluated with scikit-image's SSIM
    assert "scipy" not in unused(_recipe("canny"), {"use_beta_sigmas": True})
    assert "scipy" not in unused(_recipe("canny"), None)  # the scheduler's config is not known
    assert "scipy" not in unused(None, {})
    assert "torchvision" in unused(_recipe("canny"), None)
    assert "torchvision" not in unused(_recipe("depth"), {})  # controlnet_aux's annotators need it
    assert "torchvision" not in unused(None, {})  # `recipe evaluate` may run annotators


def test_the_scheduler_config_is_read_without_loading_or_going_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert process.scheduler_config(_loaded(tmp_path, "builtin:tiny-sd")) == {}
    folder = tmp_path / "base"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"use_beta_sigmas": true}')
    assert process.scheduler_config(_loaded(tmp_path, "./base")) == {"use_beta_sigmas": True}
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert process.scheduler_config(_loaded(tmp_path, "./base")) is None
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert process.scheduler_config(_loaded(tmp_path, "someone/not-downloaded")) is None


def test_the_machine_s_busy_share_leaves_this_process_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled since the command line started: our own work meanwhile (loading the recipe) is not another
    process's. (time, machine's busy CPU s, our CPU s) at the start and at the end, on 2 CPUs:"""
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda: 2)
    monkeypatch.setattr(process, "_cpu_at_start", (0.0, 100.0, 10.0))
    monkeypatch.setattr(process.time, "monotonic", lambda: 1.0)
    monkeypatch.setattr(process, "_cpu_now", lambda: (1.0, 101.5, 11.5))  # all of it ours
    assert process.others_cpu_percent() == 0.0
    monkeypatch.setattr(process, "_cpu_now", lambda: (1.0, 101.5, 10.5))  # one CPU-second someone else's
    assert process.others_cpu_percent() == 50.0


def test_another_busy_process_counts() -> None:
    # The child says when its loop has begun and spins until killed: on a loaded machine its interpreter
    # may take longer than any fixed pause to start, and a fixed run time may end before the sample does.
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import sys\nprint('spinning', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == "spinning\n"
        start = process._cpu_now()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(process, "_cpu_at_start", start)
            share = process.others_cpu_percent(least_s=1.0)
        # It waited out the rest of the interval, counted from the sample it started from (a time taken
        # after that sample would be later by however long psutil took, on a busy machine 20 ms).
        assert time.monotonic() - start[0] >= 1.0
        # A whole core spinning, counted in the kernel's 10 ms ticks: a quarter of it is a wide margin.
        assert share > process_share_of_one_core(0.25)
    finally:
        spinner.kill()
        spinner.wait()


def process_share_of_one_core(fraction: float) -> float:
    """`fraction` of one core, as a percentage of the whole machine's CPU time."""
    import psutil

    return 100.0 * fraction / (psutil.cpu_count() or 1)


def test_an_in_process_caller_keeps_every_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_command_line", False)
    for name in ("torch", "bitsandbytes", "triton"):  # as if none were imported yet
        monkeypatch.delitem(sys.modules, name, raising=False)
    process.keep_out(None)
    assert "bitsandbytes" not in sys.modules and "triton" not in sys.modules
    monkeypatch.setattr(process, "_command_line", True)  # what the test would see if it were `recipe`
    process.keep_out(None)
    assert sys.modules["bitsandbytes"] is None and sys.modules["triton"] is None


@pytest.mark.parametrize(("raised", "code"), [(SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(2), 2)])
def test_the_exit_status_survives_the_quick_exit(monkeypatch: pytest.MonkeyPatch, raised, code) -> None:
    calls: list[object] = []
    monkeypatch.setattr(process, "_command_line", False)
    monkeypatch.setattr(process, "_cpu_at_start", None)
    # Stand-ins: the real ones would end this test process (and threading's would stop every thread pool
    # of the tests that follow from taking work).
    monkeypatch.setattr(process.threading, "_shutdown", lambda: calls.append("threads"))
    monkeypatch.setattr(process.atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    monkeypatch.setattr(process.os, "_exit", lambda c: calls.append(c))

    def app() -> None:
        raise raised

    process.run_and_exit(app)
    assert calls == ["threads", "handlers", code]


def test_the_quick_exit_waits_for_threads_and_never_for_idle_pool_workers() -> None:
    """A thread pool nobody shut down (a library's) must not hang the exit; a running thread finishes
    before the exit handlers, as at a normal exit."""
    program = textwrap.dedent("""
        import atexit, concurrent.futures, threading, time
        from recipe_runner.cli import process

        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(lambda: 1).result()  # its workers now wait for more work

        def work():
            time.sleep(0.3)
            print("thread done", flush=True)

        threading.Thread(target=work).start()
        atexit.register(lambda: print("exit handler", flush=True))
        process._exit_now(3)
        """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout.split("\n")[:2] == ["thread done", "exit handler"]


def test_a_message_or_a_traceback_exits_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_command_line", False)
    monkeypatch.setattr(process, "_cpu_at_start", None)
    monkeypatch.setattr(process.os, "_exit", lambda c: pytest.fail("os._exit called"))

    def message() -> None:
        raise SystemExit("bad")

    def traceback() -> None:
        raise RuntimeError("boom")

    with pytest.raises(SystemExit, match="bad"):
        process.run_and_exit(message)
    with pytest.raises(RuntimeError):
        process.run_and_exit(traceback)


def test_a_run_keeps_out_what_it_does_not_use_and_skips_only_the_teardown(tmp_path: Path) -> None:
    """A real `python -m recipe_runner run`, started by a wrapper that registered an exit handler first
    (as coverage or benchmarks/step_clock.py do) and left an object whose finaliser only Python's
    teardown would call."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MINIMAL.replace("max_steps: 4", "max_steps: 1"), encoding="utf-8")
    report, finalised = tmp_path / "report.json", tmp_path / "finalised"
    wrapper = textwrap.dedent(f"""
        import atexit, json, runpy, sys

        def report():
            names = ("torch", "triton", "bitsandbytes", "torch._inductor.compile_fx", "scipy", "torchvision", "peft",
                     "cuda.bindings")
            with open({str(report)!r}, "w") as f:
                json.dump({{n: sys.modules.get(n) is not None for n in names}}, f)

        atexit.register(report)

        class Finalised:
            def __del__(self):
                open({str(finalised)!r}, "w").close()

        sys.modules["finalised_at_teardown"] = Finalised()
        sys.argv = ["recipe", "run", {str(recipe)!r}, "-o", {str(tmp_path / "run")!r}, "--quiet"]
        runpy.run_module("recipe_runner", run_name="__main__")
        """)
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    imported = json.loads(report.read_text())  # the handler registered before the run still ran
    assert imported == {
        "torch": True,
        "triton": False,
        "bitsandbytes": False,
        "torch._inductor.compile_fx": False,
        "scipy": False,
        "torchvision": False,
        "peft": False,
        "cuda.bindings": False,
    }
    assert not finalised.exists()  # no module-by-module teardown
