"""`recipe reproduce LOCK`: re-run what a lock file records, say what drifted, compare the weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import load_resolved
from recipe_runner.run.lockfile import LOCK_FORMAT, package_versions, read_lock
from recipe_runner.runfolder.layout import RunFolder


def version_drift(recorded: dict[str, str | None]) -> list[str]:
    now = package_versions()
    return [
        f"{name} {old} → {now.get(name)}"
        for name, old in sorted(recorded.items())
        if name in now and now.get(name) != old
    ]


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two diffusers ControlNet folders."""
    from safetensors.numpy import load_file

    files_a = sorted(p.name for p in a.glob("*.safetensors"))
    files_b = sorted(p.name for p in b.glob("*.safetensors"))
    if not files_a or files_a != files_b:
        return {"identical": False, "reason": f"weight files differ: {files_a} vs {files_b}"}
    max_diff = 0.0
    identical = True
    for name in files_a:
        ta, tb = load_file(a / name), load_file(b / name)
        if ta.keys() != tb.keys():
            return {"identical": False, "reason": f"{name}: different tensors"}
        for key in ta:
            x, y = ta[key], tb[key]
            if x.shape != y.shape:
                return {"identical": False, "reason": f"{name}:{key}: shape {x.shape} vs {y.shape}"}
            if x.tobytes() != y.tobytes():
                identical = False
                max_diff = max(max_diff, float(abs(x.astype("float64") - y.astype("float64")).max()))
    return {"identical": identical, "max_abs_diff": max_diff}


def reproduce_lock(
    lock_path: Path, *, output_dir: Path | None = None, quiet: bool = False, notes: Console | None = None
) -> dict[str, Any]:
    """Re-run the lock's recipe into a new folder; drift and the weights' comparison go to `notes`
    (the CLI's stderr console; None, or `quiet`: nowhere)."""
    from recipe_runner.run.pipeline import run_recipe  # the stages import torch

    def say(text: str) -> None:
        if notes is not None and not quiet:
            notes.print(text)

    lock_path = Path(lock_path)
    if lock_path.is_dir():
        lock_path = lock_path / "run.lock.json"
    lock = read_lock(lock_path)
    if lock is None or "recipe" not in lock:
        raise UserError(
            f"{lock_path} is not a readable run.lock.json",
            hint="pass RUN_DIR/run.lock.json of a finished run",
        )
    if lock.get("format") != LOCK_FORMAT:
        found = lock.get("format")
        raise UserError(f"{lock_path}: lock format {found} is not supported (expected {LOCK_FORMAT})")
    original = RunFolder(Path(os.path.abspath(lock_path.parent)))  # `run.lock.json` alone: the folder is `.`
    target = Path(output_dir) if output_dir else original.root.with_name(original.root.name + "-reproduce")
    if target.resolve() == original.root.resolve():
        raise UserError("reproduce must write into a new folder", hint="pass --output-dir somewhere else")
    drift = version_drift(lock.get("packages") or {})
    for line in drift:
        say(f"[yellow]warning:[/] version drift: {escape(line)}")
    loaded = load_resolved(lock["recipe"], Path(lock["recipe_dir"]))
    result = run_recipe(loaded, output_dir=target, quiet=quiet)
    new_lock = read_lock(RunFolder(target).lock) or {}
    old_fp = (lock.get("dataset") or {}).get("fingerprint")
    new_fp = (new_lock.get("dataset") or {}).get("fingerprint")
    data_drift = old_fp is not None and new_fp is not None and old_fp != new_fp
    if data_drift:
        say(f"[yellow]warning:[/] dataset fingerprint changed: {old_fp} → {new_fp}")
    comparison: dict[str, Any] = {"identical": None, "reason": "original has no weights"}
    if (original.controlnet).is_dir():
        comparison = compare_weights(original.controlnet, RunFolder(target).controlnet)
    if comparison["identical"]:
        say(f"[green]✓ weights are bit-identical[/] to {escape(str(original.controlnet))}")
    elif comparison["identical"] is False:
        detail = comparison.get("reason") or f"max abs difference {comparison.get('max_abs_diff'):.3g}"
        say(f"[yellow]weights differ from the original:[/] {escape(detail)}")
    return {**result, "version_drift": drift, "data_drift": data_drift, "weights": comparison}
