"""output.push_to_hub and `recipe push`: against a stand-in HfApi (no network); refused before training
when offline or without a token; the token never lands in the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import ClassVar

import huggingface_hub
import pytest
from huggingface_hub import constants

from recipe_runner.export import hub
from recipe_runner.runfolder.layout import RunFolder
from tests.export.conftest import RECIPE, run_cli

TOKEN = "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123"


class StandInApi:
    calls: ClassVar[list[tuple[str, dict]]] = []
    fail_first: int = 0

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        StandInApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        if StandInApi.fail_first:
            StandInApi.fail_first -= 1
            raise ConnectionError("connection reset")
        StandInApi.calls.append(("upload_folder", kwargs))
        return "commit-oid"


@pytest.fixture
def online(monkeypatch):
    StandInApi.calls, StandInApi.fail_first = [], 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInApi)
    monkeypatch.setattr(hub.time, "sleep", lambda _s: None)


def _recipe(tmp_path, extra: str):
    path = tmp_path / "push.yaml"
    path.write_text(RECIPE + extra)
    return path


PUSH = "output: {push_to_hub: true, hub_model_id: me/tiny-controlnet, export: [single-file]}\n"


def test_offline_push_fails_before_training_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    result = run_cli("run", _recipe(tmp_path, PUSH), "-o", tmp_path / "run")
    assert result.exit_code == 2 and "offline" in result.output and "recipe push" in result.output
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left


def test_no_token_fails_before_training_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty login cache
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    result = run_cli("run", _recipe(tmp_path, PUSH), "-o", tmp_path / "run")
    assert result.exit_code == 2 and "token" in result.output and "hf auth login" in result.output
    assert not (tmp_path / "run").exists()


def test_a_push_that_cannot_happen_stops_the_run_before_torch_is_imported(tmp_path):
    """The push check comes first of the pre-flight checks: the error in about a second, not after the
    ten or more that importing torch and diffusers takes."""
    code = (
        "import sys\nfrom recipe_runner.cli import app\n"
        f"try:\n    app(['run', {str(_recipe(tmp_path, PUSH))!r}, '-o', {str(tmp_path / 'run')!r}])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "offline" in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "exit 2 False"
    assert not (tmp_path / "run").exists()


def _publish_plan(recipe, run, *args: str) -> dict[str, tuple[str, str, str]]:
    result = run_cli("plan", recipe, "-o", run, "--json", *args)
    assert result.exit_code == 0, result.output
    return {s["name"]: (s["status"], s["reason"], s["target"]) for s in json.loads(result.output)["publish"]}


def test_run_exports_and_pushes_the_runs_files_and_never_writes_the_token(tmp_path, online, monkeypatch):
    recipe = _recipe(tmp_path, PUSH)
    planned = _publish_plan(recipe, tmp_path / "run")
    assert planned["export single-file"][:2] == ("would run", "after training")
    assert planned["export single-file"][2].endswith(
        "export/tiny-sd1-canny-step3-single-file-fp16.safetensors"
    )
    assert planned["push"][0] == "would run" and planned["push"][2] == "me/tiny-controlnet (private)"
    result = run_cli("run", recipe, "-o", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    folder = RunFolder(tmp_path / "run")
    (export,) = folder.export.glob("*.safetensors")
    assert export.name == "tiny-sd1-canny-step3-single-file-fp16.safetensors"
    (create, upload) = StandInApi.calls
    assert create[0] == "create_repo" and create[1]["repo_id"] == "me/tiny-controlnet"
    assert create[1]["private"] is True and create[1]["token"] == TOKEN
    assert upload[0] == "upload_folder" and upload[1]["folder_path"] == str(folder.root)
    selected = {p.relative_to(folder.root).as_posix() for p in hub._uploaded(folder.root)}
    assert {
        "README.md",
        "controlnet/diffusion_pytorch_model.safetensors",
        f"export/{export.name}",
    } <= selected
    assert not any(s.startswith(("dataset/", "cache/", "checkpoints/")) for s in selected)
    assert any(s.startswith("samples/") for s in selected)
    for path in folder.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path

    # Nothing changed: a second run neither exports nor pushes again, and needs no network or token.
    made = export.stat().st_mtime_ns
    assert {s for s, _, _ in _publish_plan(recipe, folder.root).values()} == {"cached"}
    StandInApi.calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("run", recipe, "-o", folder.root)
    assert result.exit_code == 0, result.output
    assert "export single-file: skipped" in result.output and "push: skipped" in result.output
    assert StandInApi.calls == [] and export.stat().st_mtime_ns == made
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # New weights (a longer run): the export is named by its steps and made again, then pushed.
    planned = _publish_plan(recipe, folder.root, "--set", "train.max_steps=4")
    assert planned["export single-file"][0] == "would run"
    assert planned["export single-file"][2].endswith("step4-single-file-fp16.safetensors")
    assert planned["push"][0] == "would run"

    # `recipe push` for the finished run, retried once on a dropped connection, with a progress line.
    StandInApi.calls, StandInApi.fail_first = [], 1
    result = run_cli("push", folder.root)
    assert result.exit_code == 0, result.output
    assert [c[0] for c in StandInApi.calls] == ["create_repo", "upload_folder"]
    assert "retrying" in result.output and "pushing" in result.output
    assert TOKEN not in result.output


def test_no_single_file_or_control_lora_for_flow_families(tmp_path):
    from recipe_runner.errors import UserError
    from recipe_runner.export.formats import check_format

    for family in ("sd3", "flux"):
        for fmt in ("single-file", "control-lora"):
            with pytest.raises(UserError) as e:
                check_format(fmt, family, lora=False)
            assert (
                e.value.exit_code == 2 and "diffusers" in e.value.hint and "sd1, sd2, sdxl" in e.value.message
            )
        check_format("diffusers", family, lora=False)
    recipe = _recipe(tmp_path, "output: {export: [single-file]}\n").read_text()
    recipe = recipe.replace("builtin:tiny-sd", "builtin:tiny-sd3")
    (tmp_path / "sd3.yaml").write_text(recipe)
    result = run_cli("run", tmp_path / "sd3.yaml", "-o", tmp_path / "sd3")
    assert result.exit_code == 2 and "no single-file format for sd3" in result.output
    assert not (tmp_path / "sd3").exists()


@pytest.mark.parametrize(
    ("export", "says"),
    [
        ("[adapter]", "adapter needs train.lora"),
        ("[control-lora]", "control-lora of a fully trained ControlNet needs output.export_rank"),
    ],
)
def test_recipe_validate_and_plan_reject_an_export_the_run_cannot_make(tmp_path, export, says):
    recipe = _recipe(tmp_path, f"output:\n  export: {export}\n")
    for command in ("validate", "plan"):
        result = run_cli(command, recipe, *(["-o", tmp_path / "run"] if command == "plan" else []))
        assert result.exit_code == 2, result.output
        assert says in result.output and "push.yaml:16:3:" in result.output  # the export: line
    assert not (tmp_path / "run").exists()


def test_plan_names_a_control_lora_by_the_rank_asked_for(tmp_path):
    recipe = _recipe(tmp_path, "output: {export: [control-lora], export_rank: 16}\n")
    planned = _publish_plan(recipe, tmp_path / "run")
    assert planned["export control-lora"][2].endswith("tiny-sd1-canny-step3-control-lora-rank16.safetensors")
