"""The `recipe` process: optional packages a run will not use are kept out, and it exits without
Python's teardown, running every exit handler first (cli/process.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipe_runner.cli import process
from recipe_runner.recipe.recipe import Recipe
from tests.conftest import MINIMAL


def _recipe(**train: object) -> Recipe:
    import yaml

    data = yaml.safe_load(MINIMAL)
    data["train"].update(train)
    return Recipe.model_validate(data)


def test_unused_packages_follow_the_recipe_and_the_machine(tmp_path: Path) -> None:
    none: tuple[str, ...] = ()
    assert process.unused_packages(_recipe(), gpu_nodes=none) == ["bitsandbytes", "triton"]
    assert process.unused_packages(_recipe(optimizer="adamw_8bit"), gpu_nodes=none) == ["triton"]
    assert process.unused_packages(_recipe(compile=True), gpu_nodes=none) == ["bitsandbytes"]
    node = tmp_path / "nvidiactl"
    node.touch()
    assert process.unused_packages(_recipe(), gpu_nodes=(str(node),)) == ["bitsandbytes"]
    assert process.unused_packages(None, gpu_nodes=none) == ["bitsandbytes", "triton"]  # sampling


def test_an_in_process_caller_keeps_every_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_command_line", False)
    for name in ("torch", "bitsandbytes", "triton"):  # as if none were imported yet
        monkeypatch.delitem(sys.modules, name, raising=False)
    process.keep_out(_recipe())
    assert "bitsandbytes" not in sys.modules and "triton" not in sys.modules
    monkeypatch.setattr(process, "_command_line", True)  # what the test would see if it were `recipe`
    process.keep_out(_recipe())
    assert sys.modules["bitsandbytes"] is None and sys.modules["triton"] is None


@pytest.mark.parametrize(("raised", "code"), [(SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(2), 2)])
def test_the_exit_status_survives_the_quick_exit(monkeypatch: pytest.MonkeyPatch, raised, code) -> None:
    calls: list[object] = []
    monkeypatch.setattr(process, "_command_line", False)
    monkeypatch.setattr(process.atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    monkeypatch.setattr(process.os, "_exit", lambda c: calls.append(c))

    def app() -> None:
        raise raised

    process.run_and_exit(app)
    assert calls == ["handlers", code]


def test_a_message_or_a_traceback_exits_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_command_line", False)
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
            names = ("torch", "triton", "bitsandbytes", "torch._inductor.compile_fx")
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
    }
    assert not finalised.exists()  # no module-by-module teardown
