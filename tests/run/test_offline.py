"""Without a network, a hub base is read from the hub cache at once instead of after huggingface_hub's
retries (recipe_runner/offline.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http

from recipe_runner import offline
from recipe_runner.errors import UserError
from recipe_runner.families.loading import load_components
from recipe_runner.recipe.loader import load_recipe
from tests.conftest import CLOSED_ENDPOINT as CLOSED
from tests.conftest import MINIMAL


def test_a_hub_base_without_a_network_fails_at_once_without_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_unprobed: None
) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    waits: list[float] = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)  # huggingface_hub's back-off between retries
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MINIMAL.replace("builtin:tiny-sd", "someone/not-in-the-cache"), encoding="utf-8")
    with pytest.raises(UserError, match="someone/not-in-the-cache"):
        load_components(load_recipe(recipe), "someone/not-in-the-cache", weights=False)
    assert waits == []  # before: 1, 2, 4, 8 ... s for each file looked up, 46-51 s in all
    assert offline.unreachable() == CLOSED
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # also for launched workers
    assert offline.cache_only_reason() == f"{CLOSED} could not be reached (no network?)"


def test_a_reachable_hub_and_a_user_s_choice_are_left_as_they_are(
    monkeypatch: pytest.MonkeyPatch, hub_unprobed: None
) -> None:
    probes: list[tuple] = []

    class Connection:
        def close(self) -> None:
            pass

    def connect(address: tuple, timeout: float) -> Connection:
        probes.append(address)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example:8443")
    offline.offline_unless_reachable()
    offline.offline_unless_reachable()  # once per process
    assert probes == [("hub.example", 8443)]
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ
    assert offline.unreachable() is None

    def refuse(address: tuple, timeout: float) -> None:
        raise AssertionError("probed")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for decided in ({"HF_HUB_OFFLINE": "0"}, {"HTTPS_PROXY": "http://proxy:3128"}):
        monkeypatch.setattr(offline, "_looked", False)
        with monkeypatch.context() as m:
            for name, value in decided.items():
                m.setenv(name, value)
            offline.offline_unless_reachable()  # the user's setting, or a proxy: huggingface_hub decides
        assert not constants.HF_HUB_OFFLINE
