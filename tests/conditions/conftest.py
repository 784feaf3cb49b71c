"""Fixtures for the condition tests: no test may reach the network, and small synthetic images."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SRC = Path(__file__).resolve().parents[2]  # the checkout, put on PYTHONPATH for subprocesses


_connect = socket.socket.connect


def _no_network(sock: socket.socket, address):
    # Local (AF_UNIX) sockets stay allowed: multiprocessing managers use them.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise RuntimeError(f"a condition test tried to connect to {address}")
    return _connect(sock, address)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HUB_OFFLINE with an empty cache, for this process and the subprocesses tests start."""
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, at import; it may already be imported.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    return cache


@pytest.fixture
def square() -> Image.Image:
    """64x64 black image with a white square from (16, 16) to (47, 47)."""
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill="white")
    return image


@pytest.fixture
def gradient() -> Image.Image:
    """64x64: red grows left to right, green top to bottom, blue constant."""
    x, y = np.meshgrid(np.arange(64), np.arange(64))
    rgb = np.stack([x * 4, y * 4, np.full_like(x, 100)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture
def run_python(tmp_path: Path):
    """Run Python code in a fresh interpreter that can import recipe_runner; returns the finished process.

    `path` entries go first on PYTHONPATH (e.g. a folder holding a fake `mediapipe`).
    """

    def run(code: str, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        entries = [str(p) for p in (path, SRC) if p is not None] + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(e for e in entries if e)
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run
