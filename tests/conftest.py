"""Shared fixtures: offline hub, a private models cache, recipe files in tmp folders, the CLI runner."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]

# No test may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread for every test (and the processes tests launch): the tiny models gain nothing
# from more, and on a busy 2-core machine OpenMP threads waiting at barriers made steps ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _models_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builtin models are built once per test session into a private cache."""
    os.environ["RECIPE_RUNNER_CACHE"] = str(tmp_path_factory.mktemp("recipe-runner-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


MINIMAL = """\
name: t
dataset:
  source: {builtin: shapes, num_samples: 32}
  resolution: 64
model:
  base: builtin:tiny-sd
train:
  max_steps: 4
  batch_size: 2
"""


CLOSED_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


@pytest.fixture
def hub_unprobed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a user's without HF_HUB_OFFLINE (the suite sets it) whose Hub is not probed yet
    (recipe_runner/offline.py)."""
    from huggingface_hub import constants

    from recipe_runner import offline

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *offline.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(offline, "_looked", False)
    monkeypatch.setattr(offline, "_unreachable", None)


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe (dedented) into tmp_path and return its path."""

    def write(text: str = MINIMAL, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def cli():
    """Run the `recipe` CLI in-process: cli("validate", path) -> Result (exit_code, stdout, stderr)."""
    from recipe_runner.cli import app

    runner = CliRunner()

    def invoke(*args: object):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


HEAVY_MODULES = ("torch", "diffusers", "datasets", "transformers")


def cli_in_a_fresh_process(*commands: list[str]) -> tuple[list[str], list[str]]:
    """Run `recipe` commands in one new Python process (each must exit 0): (their outputs, which of
    HEAVY_MODULES that process imported). For the commands that must start without torch."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\nfrom typer.testing import CliRunner\nfrom recipe_runner.cli import app\n"
        "outputs = []\n"
        f"for args in {[list(map(str, c)) for c in commands]!r}:\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "    outputs.append(r.output)\n"
        f"heavy = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
        "print(json.dumps([outputs, heavy]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outputs, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return outputs, heavy


def write_shapes_shards(
    folder: Path, rows: int, shards: int, *, resolution: int = 64, seed: int = 0, image_ext: str = "png"
) -> Path:
    """The builtin shapes data as WebDataset shards folder/00000.tar ...: NNNNNN.png + NNNNNN.txt per row
    (the images only: the condition is made while training), rows spread evenly over the shards."""
    import io
    import tarfile

    from recipe_runner.data.builtin_shapes import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(rows, (s + 1) * per)):
                sample = make_sample(i, seed=seed, resolution=resolution)
                buf = io.BytesIO()
                sample["image"].save(buf, format="PNG")
                for name, data in (
                    (f"{i:06d}.{image_ext}", buf.getvalue()),
                    (f"{i:06d}.txt", sample["prompt"].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
