"""Annotators with weights: every way of not having the weights is a UserError that says what to fetch.

None of these tests has weights, reaches the network or imports torch in this process.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from recipe_runner.conditions import build_condition
from recipe_runner.conditions.weights import resolve_weights
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import (
    DepthCondition,
    HedCondition,
    LineartCondition,
    MediapipeFaceCondition,
    MlsdCondition,
    NormalCondition,
    OpenposeCondition,
    SegmentationCondition,
)

ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators"
SAM = "https://huggingface.co/ybelkada/segment-anything"
NEEDS = [
    (HedCondition, {}, ["ControlNetHED.pth"], ANNOTATORS),
    (DepthCondition, {}, ["dpt_hybrid-midas-501f0c75.pt"], ANNOTATORS),
    (OpenposeCondition, {}, ["body_pose_model.pth"], ANNOTATORS),
    (
        OpenposeCondition,
        {"include_hand": True, "include_face": True},
        ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"],
        ANNOTATORS,
    ),
    (MlsdCondition, {}, ["mlsd_large_512_fp32.pth"], ANNOTATORS),
    (LineartCondition, {}, ["sk_model.pth"], ANNOTATORS),
    (LineartCondition, {"coarse": True}, ["sk_model2.pth"], ANNOTATORS),
    (NormalCondition, {}, ["scannet.pt"], ANNOTATORS),
    (SegmentationCondition, {}, ["checkpoints/sam_vit_b_01ec64.pth"], SAM),
]
IDS = [f"{cls.__name__}-{'-'.join(kw) or 'default'}" for cls, kw, _, _ in NEEDS]


def _error(fn, image: Image.Image | None = None) -> UserError:
    with pytest.raises(UserError) as info:
        fn(image or Image.new("RGB", (64, 64)))
    return info.value


@pytest.mark.parametrize(("cls", "kwargs", "files", "url"), NEEDS, ids=IDS)
def test_empty_local_folder_names_the_missing_files_and_the_repo(tmp_path, cls, kwargs, files, url) -> None:
    error = _error(build_condition(cls(annotator=str(tmp_path), **kwargs)))
    text = f"{error.message}\n{error.hint}"
    for name in files:
        assert name in error.message
    assert str(tmp_path) in error.message
    assert url in error.hint and f"into {tmp_path}/" in error.hint, text


@pytest.mark.parametrize(("cls", "kwargs", "files", "url"), NEEDS, ids=IDS)
def test_hub_id_while_offline_is_a_user_error(cls, kwargs, files, url) -> None:
    error = _error(build_condition(cls(**kwargs)))
    assert "HF_HUB_OFFLINE" in error.message
    assert all(name in error.message for name in files)
    assert url in error.hint
    assert "condition.annotator: models/annotators" in error.hint


def test_only_missing_files_are_listed(tmp_path) -> None:
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    error = _error(build_condition(OpenposeCondition(annotator=str(tmp_path), include_hand=True)))
    assert "hand_pose_model.pth" in error.message and "body_pose_model.pth" not in error.message


def test_relative_folder_is_resolved_against_the_recipe_folder(tmp_path) -> None:
    (tmp_path / "models" / "annotators").mkdir(parents=True)
    error = _error(build_condition(HedCondition(annotator="models/annotators"), base_dir=tmp_path))
    assert str(tmp_path / "models" / "annotators") in error.message


def test_owner_name_that_is_neither_folder_nor_cached_repo(tmp_path) -> None:
    error = _error(build_condition(HedCondition(annotator="models/annotators"), base_dir=tmp_path))
    assert "Hugging Face repo models/annotators" in error.message
    assert f"no folder {tmp_path / 'models' / 'annotators'}" in error.message
    assert (
        error.hint
        == f"download ControlNetHED.pth from {ANNOTATORS} into {tmp_path / 'models' / 'annotators'}/"
    )


def test_path_like_missing_folder(tmp_path) -> None:
    error = _error(build_condition(MlsdCondition(annotator="./weights"), base_dir=tmp_path))
    assert error.message == f"condition.annotator: folder {tmp_path / 'weights'} does not exist"
    assert error.hint == f"download mlsd_large_512_fp32.pth from {ANNOTATORS} into {tmp_path / 'weights'}/"


def test_invalid_repo_id() -> None:
    error = _error(build_condition(HedCondition(annotator="not a/repo id")))
    assert "neither an existing folder nor a Hugging Face repo id" in error.message


def test_sam_checkpoint_name_must_say_the_model_type(tmp_path) -> None:
    error = _error(build_condition(SegmentationCondition(annotator=str(tmp_path), checkpoint="sam.pth")))
    assert "cannot tell the SAM model type" in error.message


def test_weights_present_in_folder_and_in_hub_cache(tmp_path, offline_hub: Path) -> None:
    files = ["a.pth", "checkpoints/b.pth"]
    for root in (tmp_path / "local", offline_hub / "models--owner--name" / "snapshots" / ("0" * 40)):
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"")
    (offline_hub / "models--owner--name" / "refs").mkdir()
    (offline_hub / "models--owner--name" / "refs" / "main").write_text("0" * 40)
    assert resolve_weights(str(tmp_path / "local"), files, repo="r", condition="x") == tmp_path / "local"
    snapshot = resolve_weights("owner/name", files[::-1], repo="r", condition="x")
    assert (snapshot / "a.pth").is_file() and (snapshot / "checkpoints" / "b.pth").is_file()


def test_controlnet_aux_not_installed(tmp_path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "controlnet_aux", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "controlnet_aux" else real(n, *a)
    )
    error = _error(build_condition(HedCondition(annotator=str(tmp_path))))
    assert "pip install 'recipe-runner[annotators]'" in error.hint


def test_mediapipe_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    error = _error(build_condition(MediapipeFaceCondition()))
    assert "needs mediapipe" in error.message
    assert "pip install 'recipe-runner[face]'" in error.hint and "numpy<2" in error.hint


def test_mediapipe_without_solutions(monkeypatch) -> None:
    fake = types.ModuleType("mediapipe")
    fake.__version__ = "0.10.30"
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    error = _error(build_condition(MediapipeFaceCondition()))
    assert "mediapipe 0.10.30" in error.message and "0.10.22" in error.message
    assert "mediapipe==0.10.21" in error.hint


def test_without_a_network_the_hub_cache_is_read_at_once(monkeypatch, hub_unprobed) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from tests.conftest import CLOSED_ENDPOINT

    def refused(address: tuple, timeout: float) -> None:
        raise ConnectionRefusedError(address)  # this folder's tests never open a socket (conftest.py)

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_ENDPOINT)
    waits: list[float] = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)  # huggingface_hub's back-off between retries
    error = _error(build_condition(HedCondition()))
    assert waits == []
    assert f"{CLOSED_ENDPOINT} could not be reached" in error.message and "ControlNetHED.pth" in error.message
