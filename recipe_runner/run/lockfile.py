"""run.lock.json: everything needed to understand and re-run a run, and to notice drift."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from recipe_runner import __version__
from recipe_runner.errors import UserError
from recipe_runner.recipe.loader import LoadedRecipe, load_resolved
from recipe_runner.runfolder.atomic import write_text
from recipe_runner.runfolder.layout import RunFolder

LOCK_FORMAT = 1
PACKAGES = (
    "torch", "diffusers", "accelerate", "datasets", "transformers", "controlnet_aux", "huggingface_hub",
    "safetensors", "numpy", "pillow", "opencv-python-headless", "pydantic", "recipe-runner",
)  # fmt: skip
# Values under these keys are never written (tokens come from the environment and stay there).
SECRET_KEYS = ("token", "password", "secret", "api_key")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["recipe-runner"] = versions["recipe-runner"] or __version__
    return versions


def git_state(folder: Path) -> dict[str, Any]:
    """Commit of the repository holding the recipe, and whether its tree has uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    # GPUs only from a torch already imported: a run with nothing to do must not import it (seconds)
    # just to record them; the run keeps the hardware of the run that made its outputs instead.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("***" if any(s in k.lower() for s in SECRET_KEYS) else _scrub(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def new_lock(resolved: dict, recipe_hash: str, recipe_file: Path, overrides: list[str]) -> dict[str, Any]:
    return {
        "format": LOCK_FORMAT,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe_file": str(recipe_file),
        "recipe_dir": str(recipe_file.resolve().parent),
        "overrides": overrides,
        "recipe_hash": recipe_hash,
        "recipe": resolved,
        "seed": resolved.get("seed"),
        "packages": package_versions(),
        "git": git_state(recipe_file.resolve().parent),
        "hardware": hardware(),
        "dataset": {},
        "stages": {},
    }


def write_lock(path: Path, lock: dict[str, Any]) -> None:
    write_text(path, json.dumps(_scrub(lock), indent=2, default=str) + "\n")


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run_recipe(folder: RunFolder) -> tuple[LoadedRecipe, dict[str, Any]]:
    """The recipe a run recorded in its lock file (and the lock); a clear error for any other folder."""
    lock = read_lock(folder.lock)
    if lock is None or "recipe" not in lock:
        raise UserError(
            f"{folder.root} is not a run folder (no readable run.lock.json)",
            hint="pass the folder a `recipe run` wrote, e.g. runs/demo",
        )
    return load_resolved(lock["recipe"], Path(lock["recipe_dir"])), lock
