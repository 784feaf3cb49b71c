"""`evaluate_folder` end to end on a tiny run folder built here: tiny SD, untrained ControlNet, 4 held-out rows."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from recipe_runner.errors import UserError
from recipe_runner.evaluate import evaluate_folder
from recipe_runner.evaluate.report import CARD_HEADING, header_height, update_model_card
from recipe_runner.recipe.loader import LoadedRecipe, load_recipe
from recipe_runner.runfolder.layout import RunFolder

RES = 64
HOLDOUT = 4


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recipe_runner.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def write_recipe(root: Path, base: Path, **evaluate: object) -> LoadedRecipe:
    extra = "".join(f"\n  {k}: {v}" for k, v in evaluate.items())
    path = root / "recipe.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            name: eval-test
            seed: 3
            dataset:
              source: {{builtin: shapes, num_samples: 16}}
              resolution: {RES}
              holdout: {HOLDOUT}
            model:
              base: {base}
            train:
              max_steps: 7
            evaluate:
              num_inference_steps: 2
              guidance_scale: 1.0""")
        + extra
        + "\n",
        encoding="utf-8",
    )
    return load_recipe(path)


def write_dataset(folder: RunFolder, holdout: int = HOLDOUT) -> None:
    from datasets import Dataset, DatasetDict

    from recipe_runner.data.builtin_shapes import make_sample

    def rows(indices: range) -> Dataset:
        samples = [make_sample(i, seed=3, resolution=RES) for i in indices]
        keys = ("image", "conditioning_image", "prompt")
        return Dataset.from_dict({k: [s[k] for s in samples] for k in keys})

    splits = {"train": rows(range(holdout, holdout + 4))}
    if holdout:
        splits["holdout"] = rows(range(holdout))
    DatasetDict(splits).save_to_disk(str(folder.dataset_data))


def write_controlnet(folder: RunFolder, base: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    ControlNetModel.from_unet(unet).save_pretrained(folder.controlnet)
    (folder.controlnet / ".complete").write_text("ok\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    from rich.console import Console

    root = tmp_path_factory.mktemp("run")
    loaded = write_recipe(root, tiny_base)
    folder = RunFolder(root / "runs" / "eval-test")
    write_dataset(folder)
    write_controlnet(folder, tiny_base)
    folder.model_card.write_text("# eval-test\n\n## Evaluation\nold numbers\n\n## Training\nkept\n")
    out = io.StringIO()
    result = evaluate_folder(loaded, folder, console=Console(file=out, width=120))
    return folder, result, out.getvalue()


def test_results_json_has_ours_and_baseline(evaluated):
    folder, result, _ = evaluated
    saved = json.loads((folder.evaluation / "results.json").read_text())
    assert (folder.evaluation / ".complete").is_file()
    assert saved["settings"]["num_inference_steps"] == 2
    assert saved["settings"]["num_rows"] == HOLDOUT
    assert saved["settings"]["reference"] == "conditioning_image"  # the builtin data's edges are canny's
    assert saved["seconds"] > 0
    assert len(saved["rows"]) == HOLDOUT
    for who in ("ours", "baseline"):
        mean = saved["mean"][who]
        assert {"edge_precision", "edge_recall", "edge_f1", "shape_iou"} <= set(mean)
        assert all(v is None or 0.0 <= v <= 1.0 for v in mean.values())
        assert {"edge_f1", "shape_iou"} <= set(saved["rows"][0][who])
    # An untrained ControlNet's zero convolutions add nothing, and both runs start from the same noise.
    assert saved["mean"]["ours"] == saved["mean"]["baseline"]
    assert result["mean"] == saved["mean"]
    assert result["results"] == str(folder.evaluation / "results.json")
    json.dumps(result, allow_nan=False)  # the lock file records it


def test_grid_has_a_header_and_one_row_per_holdout_example(evaluated):
    folder, _, _ = evaluated
    grid = Image.open(folder.evaluation / "grid.png")
    assert grid.size == (3 * RES, header_height(RES) + HOLDOUT * RES)


def test_model_card_section_replaced_and_rest_kept(evaluated):
    folder, _, _ = evaluated
    card = folder.model_card.read_text()
    assert card.count(CARD_HEADING) == 1
    assert "old numbers" not in card
    assert "## Training\nkept" in card
    assert "| edge_f1 ↑ |" in card
    assert "](evaluation/grid.png)" in card


def test_tensorboard_scalars_and_console_table(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _, printed = evaluated
    events = EventAccumulator(str(folder.logs))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "evaluate/edge_f1" in tags and "evaluate_baseline/shape_iou" in tags
    assert events.Scalars("evaluate/edge_f1")[0].step == 7  # train.max_steps
    assert "edge_f1" in printed and "ControlNet" in printed


def test_missing_weights_name_the_folder_and_the_command(tmp_path: Path, tiny_base: Path):
    loaded = write_recipe(tmp_path, tiny_base)
    folder = RunFolder(tmp_path / "run")
    write_dataset(folder)
    with pytest.raises(UserError) as e:
        evaluate_folder(loaded, folder)
    assert str(folder.controlnet) in e.value.message
    assert e.value.hint and f"recipe train {loaded.path}" in e.value.hint
    assert not folder.evaluation.exists()


def test_no_holdout_split_asks_for_dataset_holdout(tmp_path: Path, tiny_base: Path):
    loaded = write_recipe(tmp_path, tiny_base)
    folder = RunFolder(tmp_path / "run")
    write_dataset(folder, holdout=0)
    folder.controlnet.mkdir(parents=True)
    (folder.controlnet / ".complete").write_text("ok\n")
    with pytest.raises(UserError) as e:
        evaluate_folder(loaded, folder)
    assert "held-out" in e.value.message
    assert "set dataset.holdout" in (e.value.hint or "")


def test_update_model_card_appends_then_replaces(tmp_path: Path):
    card = tmp_path / "README.md"
    card.write_text("# run\n\nintro\n")
    update_model_card(card, f"{CARD_HEADING}\n\nfirst\n")
    update_model_card(card, f"{CARD_HEADING}\n\nsecond\n")
    text = card.read_text()
    assert text == f"# run\n\nintro\n\n{CARD_HEADING}\n\nsecond\n"
    missing = tmp_path / "new" / "README.md"
    update_model_card(missing, f"{CARD_HEADING}\n\nonly\n")
    assert missing.read_text() == f"{CARD_HEADING}\n\nonly\n"


@pytest.mark.slow
def test_sdxl_base_uses_the_sdxl_pipelines(tmp_path: Path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel

    from recipe_runner.evaluate.models import load_base_pipelines
    from recipe_runner.models.tiny import build_tiny_sdxl

    base = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: xl\ndataset:\n  source: {{builtin: shapes, num_samples: 8}}\n  resolution: {RES}\n"
        f"  holdout: 2\nmodel:\n  base: {base}\n  family: sdxl\n"
    )
    loaded = load_recipe(path)
    folder = RunFolder(tmp_path / "run")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    ControlNetModel.from_unet(unet).save_pretrained(folder.controlnet)
    write_dataset(folder, holdout=2)
    pipe, _ = load_base_pipelines(loaded, folder)
    assert isinstance(pipe, StableDiffusionXLControlNetPipeline)
    result = evaluate_folder(loaded, folder)
    assert result["mean"]["ours"]["edge_f1"] is not None


def test_auto_reference_extracts_from_the_image_when_the_data_ships_its_conditions(tmp_path: Path, tiny_base):
    from recipe_runner.evaluate.stage import reference_for

    computed = write_recipe(tmp_path, tiny_base)
    assert reference_for(computed) == "conditioning_image"
    (tmp_path / "data").mkdir()
    shipped = load_recipe(
        tmp_path / "recipe.yaml",
        ["dataset.source={path: data}", "dataset.columns.conditioning_image=outline"],
    )
    assert reference_for(shipped) == "image"
    forced = load_recipe(
        tmp_path / "recipe.yaml",
        [
            "dataset.source={path: data}",
            "dataset.columns.conditioning_image=outline",
            "evaluate.reference=conditioning_image",
        ],
    )
    assert reference_for(forced) == "conditioning_image"
