"""`recipe plan`: stages that would run or are cached (and why), sizes and estimates; no torch, no work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_a_fresh_process

RECIPE = """\
name: x
dataset: {source: {builtin: shapes, num_samples: 64}, resolution: 64}
model: {base: "builtin:tiny-sd"}
train: {max_steps: 10, batch_size: 2}
"""
SD15 = """\
name: sd15
dataset: {source: {hub: fusing/fill50k}, resolution: 512, columns: {conditioning_image: conditioning_image}}
model: {base: stable-diffusion-v1-5/stable-diffusion-v1-5}
train: {max_steps: 1000, batch_size: 1}
"""


def fake_dataset(recipe: Path, run: Path) -> None:
    """What a finished dataset stage leaves: data report with its cache key, marker, resolved recipe."""
    from recipe_runner.data.build import dataset_cache_key, key_inputs
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.recipe.show import resolved_yaml

    loaded = load_recipe(recipe)
    (run / "dataset").mkdir(parents=True)
    report = {"cache_key": dataset_cache_key(loaded), "key_inputs": key_inputs(loaded), "rows_in": 64,
              "rows_out": {"train": 60, "holdout": 4}}  # fmt: skip
    (run / "dataset" / "report.json").write_text(json.dumps(report))
    (run / "dataset" / "data").mkdir()
    (run / "dataset" / "data" / "dataset_dict.json").write_text('{"splits": ["train", "holdout"]}')
    (run / "dataset" / ".complete").write_text("ok\n")
    (run / "recipe.resolved.yaml").write_text(resolved_yaml(loaded.recipe))


def plan_json(cli, *args: object) -> dict:
    r = cli("plan", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_fresh_folder_runs_every_stage(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(
        RECIPE.replace("resolution: 64}", "resolution: 64, holdout: 4}") + "evaluate: {enabled: true}\n"
    )
    r = cli("plan", recipe)
    assert r.exit_code == 0, r.output
    assert "runs/x" in r.stdout
    assert r.stdout.count("would run") == 3
    assert "no dataset yet" in r.stdout
    data = plan_json(cli, recipe)
    assert [s["name"] for s in data["stages"]] == ["dataset", "train", "evaluate"]
    assert all(s["status"] == "would run" for s in data["stages"])
    assert data["dataset"]["source_rows"] == 64 and data["dataset"]["train_rows"] == 60
    assert data["steps"] == 10 and data["effective_batch"] == 2
    assert data["memory"]["estimate"] is True and data["time"]["estimate"] is True


def test_cached_dataset_then_changed_threshold(cli, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE)
    run = tmp_path / "runs" / "x"
    fake_dataset(recipe, run)
    data = plan_json(cli, recipe, "--output-dir", run)
    dataset, train = data["stages"]
    assert dataset["status"] == "cached" and "unchanged" in dataset["reason"]
    assert train["status"] == "would run" and train["reason"] == "no trained weights yet"
    assert data["dataset"]["counted_from"] == "the built dataset (dataset/report.json)"
    assert data["dataset"]["train_rows"] == 60

    changed = cli("plan", recipe, "-o", run, "--set", "condition={type: canny, low_threshold: 50}")
    assert changed.exit_code == 0, changed.output
    assert "condition.low_threshold changed 100 → 50" in changed.stdout
    assert "the dataset stage will run first" in changed.stdout
    assert "build settings" not in changed.stdout
    speed_only = plan_json(cli, recipe, "-o", run, "--set", "dataset.num_proc=4")
    assert speed_only["stages"][0]["status"] == "cached"


def test_trained_run_is_cached_until_learning_rate_changes(cli, write_recipe, tmp_path):
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.runfolder.layout import RunFolder
    from recipe_runner.training.keys import built_dataset_fingerprint, training_cache_key

    recipe = write_recipe(RECIPE)
    run = tmp_path / "run"
    fake_dataset(recipe, run)
    loaded = load_recipe(recipe)
    (run / "controlnet").mkdir()
    (run / "controlnet" / ".complete").write_text("ok\n")
    key = training_cache_key(loaded, built_dataset_fingerprint(RunFolder(run).dataset))
    lock = {"recipe": loaded.recipe.resolved_dict(), "stages": {"train": {"cache_key": key}}}
    (run / "run.lock.json").write_text(json.dumps(lock))
    assert [s["status"] for s in plan_json(cli, recipe, "-o", run)["stages"]] == ["cached", "cached"]
    r = cli("plan", recipe, "-o", run, "--set", "train.learning_rate=3e-5")
    assert "train.learning_rate changed 1e-05 → 3e-05" in r.stdout


def test_unfinished_training_suggests_resume(cli, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE)
    run = tmp_path / "run"
    fake_dataset(recipe, run)
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "checkpoints" / "step-5" / ".complete").write_text("ok\n")
    data = plan_json(cli, recipe, "-o", run)
    assert data["stages"][1]["reason"] == "training did not finish; --resume continues from step 5"


def test_epochs_give_steps_from_rows(cli, write_recipe, tmp_path):
    recipe = write_recipe(
        RECIPE.replace(
            "train: {max_steps: 10, batch_size: 2}", "train: {max_steps: null, num_epochs: 2, batch_size: 4}"
        ).replace("resolution: 64}", "resolution: 64, max_samples: 50, holdout: 2}")
    )
    data = plan_json(cli, recipe, "-o", tmp_path / "run")
    assert data["dataset"]["train_rows"] == 48
    assert data["steps"] == 2 * 12
    assert data["epochs"] == 2.0


def test_memory_savers_lower_the_estimate(cli, write_recipe, tmp_path):
    light = write_recipe(
        SD15.replace("batch_size: 1}", "batch_size: 1, mixed_precision: fp16, gradient_checkpointing: true, "
                     "optimizer: adamw_8bit}"),
        "light.yaml",
    )  # fmt: skip
    heavy = write_recipe(SD15, "heavy.yaml")
    small = plan_json(cli, light, "-o", tmp_path / "a")["memory"]
    big = plan_json(cli, heavy, "-o", tmp_path / "b")["memory"]
    assert small["total_gb"] < big["total_gb"]
    assert small["params"]["unet"] == 860e6 and small["params"]["controlnet"] == 361e6
    assert big["savers"] and any("low-vram" in s for s in big["savers"])
    saver = next(s for s in big["savers"] if s.startswith("train.fp8_base"))
    # Each option says what it alone saves: fp8 storage of an fp32 UNet, 3 of its 4 bytes a parameter.
    assert saver.endswith(f": −{big['frozen_unet_gb'] * 3 / 4:.1f} GB")
    assert all(s.endswith(" GB") for s in big["savers"][1:])
    fp8 = plan_json(cli, light, "-o", tmp_path / "a", "--set", "train.fp8_base=true")["memory"]
    assert fp8["frozen_unet_gb"] == pytest.approx(small["frozen_unet_gb"] / 2)
    assert big["with_savers_gb"] < big["total_gb"]
    ema = plan_json(cli, heavy, "-o", tmp_path / "b", "--set", "train.ema_decay=0.999")["memory"]
    offload = next(s for s in ema["savers"] if s.startswith("train.ema_offload"))
    assert offload.endswith(f": −{361e6 * 4 / 2**30:.1f} GB")  # the fp32 average of SD 1.5's ControlNet
    assert ema["savers"][0].endswith("but train.fp8_base and train.lora and train.ema_offload)")
    r = cli("plan", heavy, "-o", tmp_path / "b")
    assert "estimate" in r.stdout and "A100" in r.stdout
    assert "unknown until downloaded" in r.stdout


def test_big_sdxl_recipe_warns_about_card_size(cli, write_recipe, tmp_path):
    recipe = write_recipe(
        SD15.replace(
            "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
        )
        .replace("resolution: 512", "resolution: 1024")
        .replace("batch_size: 1", "batch_size: 4")
    )
    r = cli("plan", recipe, "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stdout and "GB" in r.stdout
    assert "gradient_checkpointing" in r.stdout and "adamw_8bit" in r.stdout


def test_invalid_recipe_exits_2(cli, write_recipe):
    recipe = write_recipe(RECIPE + "trian: {}\n")
    r = cli("plan", recipe)
    assert r.exit_code == 2
    assert "recipe.yaml:5:1" in r.stderr


@pytest.mark.parametrize("command", ["plan", "diff"])
def test_does_not_import_torch(write_recipe, tmp_path, command):
    recipe = write_recipe(RECIPE)
    args = (
        ["plan", str(recipe), "-o", str(tmp_path / "run")]
        if command == "plan"
        else ["diff", str(recipe), str(recipe)]
    )
    _, heavy = cli_in_a_fresh_process(args)
    assert heavy == []


def test_trace_gives_the_step_peak_from_the_models_configs_alone(cli, write_recipe, tmp_path):
    """--trace reads a local base's configs, never its weights (removed here), traces the recipe's own
    step, adds the overhead (and DDP's gradient copy with several processes), and writes nothing."""
    from recipe_runner.models.tiny import resolve_builtin

    base = resolve_builtin("tiny-sd", tmp_path / "models")
    for weights in base.rglob("*.safetensors"):
        weights.unlink()
    recipe = write_recipe(RECIPE.replace('"builtin:tiny-sd"', str(base)))
    run = tmp_path / "run"
    one = plan_json(cli, recipe, "-o", run, "--trace")["memory"]["traced"]
    assert one["models"] == f"the configs of {base}"
    frozen = one["frozen_weights_gb"] + one["controlnet_weights_gb"] + one["optimizer_state_gb"]
    assert frozen < one["peak_gb"] < frozen + 0.1
    assert one["total_gb"] == pytest.approx(one["peak_gb"] + one["overhead_gb"], abs=0.01)
    assert not run.exists()

    two = plan_json(cli, recipe, "-o", run, "--trace", "--set", "launch.num_processes=2")["memory"]["traced"]
    assert two["ddp_buckets_gb"] == one["controlnet_weights_gb"] > 0
    # The trace follows the configs: a UNet with three layers per block weighs more than one with two.
    config = base / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 3}))
    bigger = plan_json(cli, recipe, "-o", run, "--trace")["memory"]["traced"]
    assert bigger["frozen_weights_gb"] > one["frozen_weights_gb"]
    text = cli("plan", recipe, "-o", run, "--trace").stdout
    assert "memory (traced)" in text and "traced on fake tensors" in text


def test_trace_with_buckets_traces_the_square_and_the_most_elongated_bucket(
    cli, write_recipe, tmp_path, monkeypatch
):
    from recipe_runner.training import memory_trace

    sizes, trace = [], memory_trace.trace

    def recording(loaded, c, autocast_cache=None, size=None):
        sizes.append(size)
        return trace(loaded, c, autocast_cache, size)

    monkeypatch.setattr(memory_trace, "trace", recording)
    recipe = write_recipe(RECIPE)
    args = ("-o", tmp_path / "run", "--trace", "--set", "dataset.buckets={enabled: true, step: 16}")
    traced = plan_json(cli, recipe, *args)["memory"]["traced"]
    assert sizes == [None, (80, 48)] and traced["size"] in ("64x64", "80x48")
    assert "most elongated bucket" in cli("plan", recipe, *args).stdout


def test_trace_of_an_unreachable_hub_model_uses_its_familys_architecture(cli, write_recipe, tmp_path):
    """Offline, with nothing downloaded: the standard SD 1.5 architecture, and the plan says so."""
    recipe = write_recipe(SD15 + "extends: " + str(Path(__file__).parents[2] / "recipes/base/low-vram.yaml"))
    traced = plan_json(cli, recipe, "-o", tmp_path / "run", "--trace")["memory"]["traced"]
    assert traced["models"].startswith("the sd15 architecture")
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in traced["models"]
    assert traced["frozen_weights_gb"] == pytest.approx(860e6 * 2 / 2**30, rel=0.01)
    assert 5 < traced["peak_gb"] < 6  # benchmarks/RESULTS.md: 5.43 GiB


@pytest.mark.parametrize(
    ("base", "resolution", "warned"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, False),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 640, False),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 1024, True),
        ("stabilityai/stable-diffusion-xl-base-1.0", 512, True),
        ("stabilityai/stable-diffusion-xl-base-1.0", 1024, False),
        ("builtin:tiny-sd", 1024, False),  # builtins are for trying things out
    ],
)
def test_a_resolution_far_from_the_bases_is_warned_about(
    cli, write_recipe, tmp_path, base, resolution, warned
):
    recipe = write_recipe(
        SD15.replace("stable-diffusion-v1-5/stable-diffusion-v1-5", base).replace("512", str(resolution))
    )
    found = [w for w in plan_json(cli, recipe, "-o", tmp_path / "run")["warnings"] if "trained at" in w]
    assert bool(found) == warned
    if warned:
        assert f"dataset.resolution {resolution}" in found[0]


def test_a_local_base_is_judged_by_its_own_image_size(cli, write_recipe, tmp_path):
    """A local folder says its size itself (UNet sample_size x VAE factor): tiny-sd's is 64 px; and
    `recipe run` warns as plan does, before it trains."""
    from recipe_runner.models.tiny import resolve_builtin

    base = resolve_builtin("tiny-sd", tmp_path / "models")
    recipe = write_recipe(RECIPE.replace('"builtin:tiny-sd"', str(base)))
    assert not [w for w in plan_json(cli, recipe, "-o", tmp_path / "a")["warnings"] if "trained at" in w]
    big = write_recipe(
        RECIPE.replace('"builtin:tiny-sd"', str(base)).replace("resolution: 64", "resolution: 256")
    )
    warned = [w for w in plan_json(cli, big, "-o", tmp_path / "b")["warnings"] if "trained at" in w]
    assert warned == [
        "dataset.resolution 256 for a base trained at 64 px: far from it, the base model's own images "
        "degrade (set dataset.resolution: 64 unless that is the point)"
    ]
    run = tmp_path / "run"
    small = ["--set", "dataset.source={builtin: shapes, num_samples: 6}", "--set", "train.max_steps=1"]
    small += ["--set", "train.validation={num_images: 1, num_rows: 1, num_inference_steps: 1}"]
    assert cli("train", big, "-o", run, "--quiet", *small).exit_code == 0
    assert warned[0] in (run / "log.txt").read_text().replace("\n", " ")


@pytest.mark.parametrize(
    ("sets", "warned"),
    [
        ((), None),
        (("train.learning_rate=1e-3",), "train.learning_rate 0.001 for a whole ControlNet"),
        (("train.learning_rate=1e-4", "train.lora={rank: 8}"), None),
        (("train.learning_rate=1e-7", "train.lora={rank: 8}"), "train.learning_rate 1e-07 for a LoRA"),
    ],
)
def test_a_learning_rate_far_from_the_methods_is_warned(cli, write_recipe, tmp_path, sets, warned):
    recipe = write_recipe(SD15)
    args = [a for s in sets for a in ("--set", s)]
    warnings = [
        w for w in plan_json(cli, recipe, "-o", tmp_path / "run", *args)["warnings"] if "learning_rate" in w
    ]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(warned), warnings


PARTIAL = "the precompute encodes only the rows these steps draw"


@pytest.mark.parametrize(("length", "partial"), [("max_steps: 10", True), ("max_steps: 32", False)])
def test_plan_says_when_the_precompute_encodes_only_the_rows_drawn(
    cli, write_recipe, tmp_path, length, partial
):
    """64 rows at batch 2: 10 steps draw 20 of them (less than an epoch), 32 steps every one."""
    recipe = write_recipe(RECIPE.replace("max_steps: 10", length))
    shown = " ".join(cli("plan", recipe, "-o", tmp_path / "run").output.split())
    assert (PARTIAL in shown) is partial
    off = cli("plan", recipe, "-o", tmp_path / "b", "--set", "train.precompute=false").output
    assert PARTIAL not in " ".join(off.split())
    assert plan_json(cli, recipe, "-o", tmp_path / "run")["precompute"] is True
