"""Tiny offline training runs: a shapes dataset written in the built-dataset layout, recipes on tiny models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/diffusers import huggingface_hub
# One intra-op thread (also for launched workers, which inherit it): the tiny models gain nothing from
# more, and on a shared 2-core machine two OpenMP threads that wait for each other at every barrier
# made a tiny step ~100x slower (8 s instead of 60 ms).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from recipe_runner.recipe.loader import LoadedRecipe, load_recipe
from recipe_runner.runfolder.layout import RunFolder

RESOLUTION = 64


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def write_shapes_dataset(data_dir: Path, rows: int, holdout: int = 2, seed: int = 0) -> Path:
    """The dataset stage's output contract: DatasetDict(train[, holdout]) with image/conditioning_image/prompt."""
    from datasets import Dataset, DatasetDict, Image

    from recipe_runner.data.builtin_shapes import make_sample

    samples = [make_sample(i, seed=seed, resolution=RESOLUTION) for i in range(rows + holdout)]

    def split(part: list[dict]) -> Dataset:
        columns = {k: [s[k] for s in part] for k in ("image", "conditioning_image", "prompt")}
        return (
            Dataset.from_dict(columns)
            .cast_column("image", Image())
            .cast_column("conditioning_image", Image())
        )

    splits = {"train": split(samples[:rows])}
    if holdout:
        splits["holdout"] = split(samples[rows:])
    DatasetDict(splits).save_to_disk(str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", rows=8)


BASE_RECIPE = """\
name: tiny
seed: 0
dataset:
  source: {builtin: shapes, num_samples: 10}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 4
  batch_size: 2
  learning_rate: 1.0e-4
  checkpoint_every: 2
  validation: {every: 1000, num_images: 1, num_rows: 1, num_inference_steps: 1, guidance_scale: 1.0}
logging: {tracker: none, every: 1}
"""


MakeRun = Callable[..., tuple[LoadedRecipe, RunFolder]]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One precompute cache for all runs on `shapes_data`: entries are keyed by content (the copied dataset
    keeps its files' sizes and times), so each model/dtype is encoded once per session, as on a machine
    that reruns recipes."""
    return tmp_path_factory.mktemp("precompute-cache")


@pytest.fixture
def make_run(tmp_path: Path, shapes_data: Path, shared_cache: Path) -> MakeRun:
    """make_run("train.max_steps=6", ..., name="a") -> (loaded recipe, run folder with the dataset in place).

    Calling it again with an existing name gives the same folder with the new recipe (to resume)."""

    def make(*overrides: str, name: str = "run", recipe: str = BASE_RECIPE, data: Path | None = None):
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(textwrap.dedent(recipe))
        loaded = load_recipe(recipe_path, list(overrides))
        folder = RunFolder(tmp_path / name)
        if not folder.dataset_data.exists():
            shutil.copytree(data or shapes_data, folder.dataset_data)
            if data is None:
                folder.cache.symlink_to(shared_cache, target_is_directory=True)
        return loaded, folder

    return make


@pytest.fixture
def plan_recipe(tmp_path: Path) -> Path:
    """A small recipe file on the tiny model, for `recipe plan` and estimates."""
    path = tmp_path / "plan.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            name: t
            dataset: {source: {builtin: shapes, num_samples: 16}, resolution: 64}
            model: {base: builtin:tiny-sd}
            train: {max_steps: 4, batch_size: 2}
            """
        )
    )
    return path


def final_weights(folder: RunFolder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder.controlnet / "diffusion_pytorch_model.safetensors")


@pytest.fixture
def straight_and_resumed(make_run: MakeRun) -> Callable[..., tuple[RunFolder, RunFolder]]:
    """check(*overrides, data=None) trains 4 steps straight, and 2 then --resume to 4 (in folders
    "straight" and "short"); returns both folders after asserting the resume happened and that the final
    weights are bit-identical."""
    from recipe_runner.training import train_controlnet

    def check(*overrides: str, data: Path | None = None) -> tuple[RunFolder, RunFolder]:
        loaded, straight = make_run(*overrides, "train.max_steps=4", name="straight", data=data)
        train_controlnet(loaded, straight)
        loaded, short = make_run(*overrides, "train.max_steps=2", name="short", data=data)
        train_controlnet(loaded, short)
        loaded, _ = make_run(*overrides, "train.max_steps=4", name="short", data=data)
        assert train_controlnet(loaded, short, resume=True)["resumed_from"] == 2
        a, b = final_weights(straight), final_weights(short)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return straight, short

    return check
