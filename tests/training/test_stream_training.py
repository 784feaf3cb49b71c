"""Training from a streaming source: the demo's shapes as WebDataset shards, the condition made on the fly,
stopped mid-epoch and resumed to the weights of an unbroken run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from recipe_runner.data.build import build_dataset
from recipe_runner.errors import Interrupted, UserError
from recipe_runner.recipe.loader import load_recipe
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.training import train_controlnet
from tests.conftest import write_shapes_shards
from tests.training.conftest import BASE_RECIPE
from tests.training.test_resume import _interrupt_at, _same_weights

RECIPE = (
    BASE_RECIPE.replace("name: tiny", "name: stream")
    .replace(
        "  source: {builtin: shapes, num_samples: 10}\n",
        '  source: {webdataset: "shards/{00000..00003}.tar", shuffle_buffer: 6}\n'
        "  columns: {image: png, prompt: txt}\n  holdout: 2\n",
    )
    .replace("max_steps: 4", "max_steps: 8")
    .replace("checkpoint_every: 2", "checkpoint_every: 100")
)


@pytest.fixture
def stream_run(tmp_path: Path):
    """stream_run(*overrides, name=...) -> (loaded recipe, run folder with the stream's dataset stage done)."""
    write_shapes_shards(tmp_path / "shards", rows=16, shards=4)  # 14 train rows: 7 steps an epoch
    recipe_path = tmp_path / "stream.yaml"
    recipe_path.write_text(textwrap.dedent(RECIPE))

    def make(*overrides: str, name: str = "run"):
        loaded = load_recipe(recipe_path, list(overrides))
        folder = RunFolder(tmp_path / name)
        build_dataset(loaded, folder)
        return loaded, folder

    return make


@pytest.mark.parametrize(
    "shuffle",
    ["true", pytest.param("false", marks=pytest.mark.slow)],  # replayed buffer order; datasets' state_dict
)
def test_a_stream_stopped_mid_epoch_resumes_to_the_unbroken_runs_weights(stream_run, monkeypatch, shuffle):
    settings = (f"dataset.shuffle={shuffle}", "train.gradient_accumulation_steps=2")
    loaded, straight = stream_run(*settings, name="straight")
    results = train_controlnet(loaded, straight)
    assert results["steps"] == 8 and not results["precomputed"]  # 32 rows: past the first epoch of 14

    loaded, stopped = stream_run(*settings, name="stopped")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        with pytest.raises(Interrupted):
            train_controlnet(loaded, stopped)
    state = json.loads((stopped.checkpoints / "step-3" / "state.json").read_text())
    # 12 rows trained (3 steps x 2 micro-batches x 2): mid-epoch, with the held-out rows read past.
    (position,) = state["stream"]
    assert position["epoch"] == 0 and 12 <= position["rows_read"] < 16
    assert ("state_dict" in position) is (shuffle == "false")
    results = train_controlnet(loaded, stopped, resume=True)
    assert results["resumed_from"] == 3 and results["steps"] == 8
    assert _same_weights(straight, stopped)


def test_a_stream_trains_other_weights_than_another_order(stream_run):
    """The weights depend on the stream's order: the bit-identical resume above is not a run that
    ignores its data."""
    loaded, a = stream_run("train.max_steps=3", name="a")
    train_controlnet(loaded, a)
    loaded, b = stream_run("train.max_steps=3", "dataset.source.shuffle_buffer=2", name="b")
    train_controlnet(loaded, b)
    assert not _same_weights(a, b)


def test_resuming_a_stream_with_another_process_count_is_refused(stream_run):
    from recipe_runner.training.stage import _restore_stream

    class Session:
        class accelerator:  # stands in for accelerate's object
            num_processes, process_index = 1, 0

        stream = None

    saved = {"path": "checkpoints/step-2", "stream": [{"epoch": 0, "rows_read": 4}] * 2}
    with pytest.raises(UserError) as info:
        _restore_stream(Session(), saved)
    assert "made by 2 process(es)" in info.value.message and "num_processes: 2" in info.value.hint


def test_a_streaming_recipe_runs_then_skips_every_stage(tmp_path: Path, cli):
    write_shapes_shards(tmp_path / "shards", rows=8, shards=2)
    recipe = tmp_path / "r.yaml"
    text = RECIPE.replace("{00000..00003}", "{00000..00001}").replace("max_steps: 8", "max_steps: 2")
    recipe.write_text(text + f"output: {{dir: {tmp_path / 'run'}}}\n")
    first = cli("run", recipe)
    assert first.exit_code == 0, first.output
    assert "streaming from 2 WebDataset shards" in first.output
    report = json.loads((tmp_path / "run" / "dataset" / "report.json").read_text())
    assert report["streaming"] and report["rows_out"] == {"holdout": 2}
    second = cli("run", recipe)
    assert second.exit_code == 0 and "dataset: skipped" in second.output and "train: skipped" in second.output
    plan = cli("plan", recipe)
    assert "streamed from 2 WebDataset shards" in plan.output


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stream_their_own_shards_and_resume(stream_run, monkeypatch):
    """launch.num_processes: 2 on 4 shards: each process reads two whole shards; a run stopped at step 2
    and resumed ends with the weights of the unbroken two-process run."""
    settings = ("launch.num_processes=2", "train.batch_size=1")
    loaded, straight = stream_run(*settings, "train.max_steps=4", name="straight")
    results = train_controlnet(loaded, straight)
    assert results["processes"] == 2 and results["steps"] == 4
    loaded, short = stream_run(*settings, "train.max_steps=2", name="short")
    train_controlnet(loaded, short)
    positions = json.loads((short.checkpoints / "step-2" / "state.json").read_text())["stream"]
    assert [p["rows_read"] >= 2 for p in positions] == [True, True]
    loaded, _ = stream_run(*settings, "train.max_steps=4", name="short")
    assert train_controlnet(loaded, short, resume=True)["resumed_from"] == 2
    assert _same_weights(straight, short)
