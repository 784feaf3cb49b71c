"""`recipe run`, `reproduce`, `sample` and `evaluate` as a user types them: files and exit codes out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

TINY = """\
name: tiny
seed: 3
dataset:
  source: {builtin: shapes, num_samples: 24}
  resolution: 64
  holdout: 4
model:
  base: builtin:tiny-sd
train:
  max_steps: 4
  batch_size: 2
  learning_rate: 1.0e-4
  checkpoint_every: 2
  validation: {every: 4, num_images: 1, num_rows: 2, num_inference_steps: 2, guidance_scale: 1.0}
logging: {tracker: tensorboard}
evaluate: {enabled: true, num_inference_steps: 2}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run of every stage, shared by the tests that only read it."""
    from typer.testing import CliRunner

    from recipe_runner.cli import app

    root = tmp_path_factory.mktemp("run")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY)
    out = root / "runs" / "tiny"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return recipe, out, result


def test_run_leaves_the_documented_run_folder(finished_run):
    _, out, _ = finished_run
    for name in ("recipe.resolved.yaml", "run.lock.json", "log.txt", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "dataset" / "preview.png").is_file()
    assert (out / "controlnet" / "config.json").is_file()
    assert list((out / "samples").glob("step-4.png"))
    assert list((out / "checkpoints").glob("step-*"))
    assert (out / "evaluation" / "results.json").is_file()
    lock = json.loads((out / "run.lock.json").read_text())
    assert lock["recipe"]["train"]["max_steps"] == 4
    assert lock["packages"]["torch"] and lock["packages"]["diffusers"]
    assert lock["dataset"]["fingerprint"]
    assert {"dataset", "train", "evaluate"} <= set(lock["stages"])
    assert "hardware" in lock and "git" in lock
    card = (out / "README.md").read_text()
    # Hub metadata (a builtin base is no hub repo, so no base_model) and the evaluation
    assert card.startswith("---\nlicense:") and "library_name: diffusers" in card and "## Evaluation" in card


def test_controlnet_reloads_in_diffusers(finished_run):
    from diffusers import ControlNetModel

    _, out, _ = finished_run
    model = ControlNetModel.from_pretrained(out / "controlnet")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_second_run_skips_every_stage(cli, finished_run):
    recipe, out, _ = finished_run
    result = cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    for stage in ("dataset", "train", "evaluate"):
        assert f"✓ {stage}: skipped" in result.stderr, result.stderr


def test_a_second_run_with_nothing_to_do_imports_no_torch(finished_run):
    """Seconds, not the ~15 s of importing torch and diffusers; and the lock keeps the hardware of the
    run that made the outputs."""
    import subprocess
    import sys

    recipe, out, _ = finished_run
    before = json.loads((out / "run.lock.json").read_text())["hardware"]
    code = (
        "import json, sys\n"
        "from recipe_runner.cli import app\n"
        "try:\n"
        f"    app(['run', {str(recipe)!r}, '-o', {str(out)!r}])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'datasets') if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, done.stderr
    assert "✓ train: skipped" in done.stderr
    assert json.loads((out / "run.lock.json").read_text())["hardware"] == before


def test_the_summary_gives_each_stage_its_peak_memory(finished_run):
    _, out, result = finished_run
    assert "peak RSS" in result.stderr
    stages = json.loads((out / "run.lock.json").read_text())["stages"]
    peaks = [stages[name]["peak_rss_mb"] for name in ("dataset", "train", "evaluate")]
    assert 0 < peaks[0] <= peaks[1] <= peaks[2]  # the process's peak so far, at each stage's end


def test_changing_the_learning_rate_reuses_the_dataset(cli, finished_run, tmp_path):
    recipe, out, _ = finished_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    (copy / ".in-use").unlink(missing_ok=True)
    result = cli("run", recipe, "-o", copy, "--set", "train.learning_rate=2e-4")
    assert result.exit_code == 0, result.output
    assert "✓ dataset: skipped" in result.stderr
    assert "▶ train: running" in result.stderr


def test_reproduce_gives_bit_identical_weights(cli, finished_run, tmp_path):
    _, out, _ = finished_run
    target = tmp_path / "again"
    result = cli("reproduce", out / "run.lock.json", "-o", target, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["weights"]["identical"] is True, payload["weights"]
    assert payload["data_drift"] is False


def test_sample_writes_images(cli, finished_run, tmp_path):
    _, out, _ = finished_run
    cond = tmp_path / "cond.png"
    Image.new("RGB", (64, 64), "black").save(cond)
    result = cli("sample", out, "--condition", cond, "--prompt", "a red circle", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout)["images"]
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)


def test_sample_a_folder_of_conditions_with_extraction(cli, finished_run, tmp_path, monkeypatch):
    """--condition DIR samples each image (skipping other files); --extract makes each condition with
    the recipe's (it was accepted and ignored before); --scale reaches the pipeline's record."""
    import recipe_runner.conditions as conditions

    made = []
    build = conditions.build_condition

    def recording(*args, **kwargs):
        condition = build(*args, **kwargs)

        def extract(image):
            made.append(image.size)
            return condition(image)

        return extract

    monkeypatch.setattr(conditions, "build_condition", recording)
    _, out, _ = finished_run
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("b.png", "blue"), ("a.jpg", "red")):
        Image.new("RGB", (64, 64), colour).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    args = ("--prompt", "a circle", "--steps", "1", "--num-images", "2", "--scale", "0.5", "--json")
    result = cli("sample", out, "--condition", photos, "--extract", *args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [Path(c["condition"]).name for c in record["conditions"]] == ["a.jpg", "b.png"]
    assert len(record["images"]) == 4 and all("-a-seed0-" in p for p in record["conditions"][0]["images"])
    assert made == [(64, 64), (64, 64)] and record["extracted"] is True
    assert record["conditioning_scale"] == 0.5
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("sample", out, "--condition", empty, "--prompt", "p")
    assert result.exit_code == 2 and "a folder without images" in result.stderr


def test_evaluate_command_reports_numbers(cli, finished_run):
    _, out, _ = finished_run
    result = cli("evaluate", out, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert "edge_f1" in payload["mean"]["ours"] and "edge_f1" in payload["mean"]["baseline"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "nowhere", "--condition", "x.png", "--prompt", "p"], "is not a run folder"),
        (["evaluate", "nowhere"], "is not a run folder"),
        (["reproduce", "nowhere/run.lock.json"], "not a readable run.lock.json"),
    ],
)
def test_commands_on_a_missing_run_folder(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_sample_with_an_unreadable_condition(cli, finished_run, tmp_path):
    _, out, _ = finished_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = cli("sample", out, "--condition", bad, "--prompt", "p")
    assert result.exit_code == 2
    assert "not a readable image" in result.stderr


def test_a_folder_in_use_is_refused(cli, write_recipe, tmp_path):
    import fcntl

    recipe = write_recipe(TINY)
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".in-use", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("run", recipe, "-o", out)
    assert result.exit_code == 2
    assert "is in use" in result.stderr
    assert not (out / "dataset").exists()


def test_invalid_recipe_writes_nothing(cli, write_recipe, tmp_path):
    recipe = write_recipe(TINY.replace("max_steps: 4", "max_steps: -4"))
    out = tmp_path / "never"
    result = cli("run", recipe, "-o", out)
    assert result.exit_code == 2
    assert not out.exists()


def test_an_unloadable_base_fails_before_the_dataset_is_built(cli, write_recipe, tmp_path):
    """Building a big dataset can take hours: the base's configs are loaded first, so a misspelt hub id
    is exit 2 at once. The dataset stage alone does not need the models."""
    recipe = write_recipe(TINY.replace("base: builtin:tiny-sd", "base: nobody/no-such-model"))
    out = tmp_path / "runs" / "bad"
    result = cli("run", recipe, "-o", out)
    assert result.exit_code == 2, result.output
    assert "could not load model.base from 'nobody/no-such-model'" in result.output
    assert not (out / "dataset").exists()
    assert cli("build-dataset", recipe, "-o", out).exit_code == 0


def test_weight_files_are_as_readable_as_any_other_file(finished_run):
    """safetensors writes 0600; a run's weights are shared like its other files (umask 022: 0644)."""
    import os

    _, out, _ = finished_run
    umask = os.umask(0)
    os.umask(umask)
    files = [*(out / "controlnet").iterdir(), *next((out / "checkpoints").iterdir()).iterdir()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in weights if p.is_file())


@pytest.mark.parametrize(
    ("base", "controlnet_class"),
    [("builtin:tiny-sd3", "SD3ControlNetModel"), ("builtin:tiny-flux", "FluxControlNetModel")],
)
def test_flow_family_runs_and_reproduces_bit_identically(cli, tmp_path, base, controlnet_class):
    """SD3 and FLUX.1 through every stage as a user runs them, and `recipe reproduce` of their lock."""
    import diffusers

    recipe = tmp_path / "flow.yaml"
    recipe.write_text(TINY.replace("base: builtin:tiny-sd", f"base: {base}").replace("tensorboard", "none"))
    out = tmp_path / "runs" / "flow"
    result = cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    getattr(diffusers, controlnet_class).from_pretrained(out / "controlnet")
    assert list((out / "samples").glob("step-4.png")) and (out / "README.md").is_file()
    assert (out / "evaluation" / "results.json").is_file()
    again = cli("reproduce", out / "run.lock.json", "-o", tmp_path / "again", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["weights"]["identical"] is True


def test_the_flow_matching_demo_runs_on_its_shipped_base(cli, tmp_path):
    """recipes/demo-sd3.yaml as shipped, shrunk by --set to a few rows and steps: builtin:shapes-sd3 (a
    4-channel VAE shrinking 4x, 16-token CLIP tokenizers, no T5) through training, sampling, evaluation."""
    from diffusers import SD3ControlNetModel

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo-sd3.yaml"
    out = tmp_path / "runs" / "demo-sd3"
    shrink = {
        "dataset.source.num_samples": 20,
        "dataset.holdout": 2,
        "train.max_steps": 2,
        "train.batch_size": 2,
        "train.checkpoint_every": 2,
        "train.validation.every": 2,
        "train.validation.num_rows": 2,
        "train.validation.num_inference_steps": 2,
        "evaluate.num_inference_steps": 2,
    }
    sets = [arg for key, value in shrink.items() for arg in ("--set", f"{key}={value}")]
    result = cli("run", recipe, "-o", out, *sets)
    assert result.exit_code == 0, result.output
    controlnet = SD3ControlNetModel.from_pretrained(out / "controlnet")
    assert controlnet.config.in_channels == 4 and controlnet.config.num_layers == 5
    assert Image.open(out / "samples" / "step-2.png").size[1] >= 64
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert "shape_iou" in json.dumps(results)
