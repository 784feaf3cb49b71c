"""Fixtures for the dataset stage: recipes in tmp folders, small image files, building and reading back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

# No test may reach the Hugging Face hub (set before datasets is imported by any test).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def recipe(tmp_path: Path) -> Callable[..., Any]:
    """recipe(dataset={...}, condition={...}, seed=0) -> LoadedRecipe, written to tmp_path/recipe.yaml."""
    from recipe_runner.recipe.loader import load_recipe

    def make(dataset: dict, *, overrides: tuple[str, ...] = (), **top: Any) -> Any:
        data = {"name": "t", "seed": 0, **top, "dataset": {"resolution": 32, **dataset}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return load_recipe(path, overrides)

    return make


@pytest.fixture
def folder(tmp_path: Path) -> Any:
    from recipe_runner.runfolder.layout import RunFolder

    return RunFolder(tmp_path / "run")


@pytest.fixture
def build(folder: Any) -> Callable[..., dict]:
    """build(loaded, force=False) -> report, into tmp_path/run."""
    from recipe_runner.data.build import build_dataset

    def run(loaded: Any, **kw: Any) -> dict:
        return build_dataset(loaded, folder, **kw)

    return run


@pytest.fixture
def built(folder: Any) -> Callable[[], Any]:
    """The DatasetDict in the run folder."""

    def read() -> Any:
        import datasets

        return datasets.load_from_disk(str(folder.dataset_data))

    return read


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, non-constant RGB image (canny finds edges in it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, size=3)
    arr = np.stack([(x * 7 + base[0]) % 256, (y * 5 + base[1]) % 256, ((x + y) * 3 + base[2]) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.fixture
def make_photo() -> Callable[..., Image.Image]:
    return photo


@pytest.fixture
def images(tmp_path: Path) -> Callable[..., list[str]]:
    """images(folder, n, size=(48, 40)) -> relative file names 000.png.. written under tmp_path/folder."""

    def write(sub: str, n: int, size: tuple[int, int] = (48, 40), ext: str = "png") -> list[str]:
        root = tmp_path / sub
        root.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            name = f"{i:03d}.{ext}"
            photo(*size, seed=i).save(root / name)
            names.append(name)
        return names

    return write
