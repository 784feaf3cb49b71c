"""Streaming sources: WebDataset shards in the recipe, the dataset stage's preview, rows split by rank,
and stream positions that resume at the next row."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from recipe_runner.errors import RecipeError, UserError
from recipe_runner.recipe.shards import expand_braces
from tests.conftest import cli_in_a_fresh_process, write_shapes_shards

STREAM = {"webdataset": "shards/{00000..00003}.tar"}
COLUMNS = {"image": "png", "prompt": "txt"}


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shapes_shards(tmp_path / "shards", rows=24, shards=4, resolution=32)


def _problems(recipe, **dataset) -> str:
    with pytest.raises(RecipeError) as info:
        recipe(dataset)
    return "\n".join(p.message for p in info.value.problems)


def test_brace_patterns_expand_as_braceexpand_does():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_a_webdataset_recipe_validates_and_streams(recipe, shards):
    loaded = recipe({"source": STREAM, "columns": COLUMNS})
    assert loaded.recipe.dataset.source.streams and loaded.recipe.dataset.source.kind == "webdataset"
    # Latents of a stream cannot be cached ahead: steps encode, as train.precompute: false does.
    assert loaded.recipe.train.precompute and not loaded.recipe.precomputes
    hub = recipe({"source": {"hub": "owner/name", "streaming": True}})
    assert hub.recipe.dataset.source.streams and not hub.recipe.precomputes


def test_what_a_stream_cannot_do_is_refused_with_the_reason(recipe, shards):
    src = {"source": STREAM, "columns": COLUMNS}
    assert "bound training with train.max_steps" in _problems(recipe, **src, max_samples=10)
    assert "every image's size" in _problems(recipe, **src, buckets={"enabled": True, "step": 32})
    assert "`webdataset` source always streams" in _problems(recipe, source={"path": "x", "streaming": True})
    assert "applies only to a streaming source" in _problems(
        recipe, source={"builtin": "shapes", "shuffle_buffer": 10}
    )
    assert "exactly one of hub, path or builtin, or webdataset shards" in _problems(
        recipe, source={**STREAM, "builtin": "shapes"}
    )
    with pytest.raises(RecipeError) as info:
        recipe(src, train={"max_steps": None, "num_epochs": 2})
    assert "set train.max_steps" in info.value.problems[0].message


def test_a_pattern_that_matches_no_file_is_a_located_error(write_recipe, cli, tmp_path):
    write_shapes_shards(tmp_path / "shards", rows=4, shards=2, resolution=32)
    text = "name: t\ndataset:\n  source: {webdataset: 'shards/{00000..00003}.tar'}\n  columns: {image: png, prompt: txt}\n"
    result = cli("validate", write_recipe(text))
    assert result.exit_code == 2
    assert "2 of the 4 shards" in result.output and "00002.tar" in result.output
    result = cli("validate", write_recipe(text.replace("{00000..00003}", "none-*")))
    assert result.exit_code == 2 and "matches no file" in result.output


def test_a_shard_without_the_mapped_column_names_the_shard_and_its_keys(recipe, build, shards):
    write_shapes_shards(shards, rows=24, shards=4, resolution=32, image_ext="jpg.bad")  # replaces them
    loaded = recipe({"source": STREAM, "columns": COLUMNS})
    with pytest.raises(UserError) as info:
        build(loaded)
    assert "no 'png' in shard" in info.value.message and "00000.tar" in info.value.message
    assert "has jpg.bad, txt" in info.value.message


def test_a_file_that_is_not_a_tar_is_a_user_error(recipe, build, shards):
    (shards / "00001.tar").write_bytes(b"not a tar file")
    with pytest.raises(UserError) as info:
        build(recipe({"source": STREAM, "columns": COLUMNS}))
    assert "00001.tar is not a readable tar file" in info.value.message


def test_the_dataset_stage_reads_only_the_first_rows(recipe, build, built, folder, shards):
    loaded = recipe({"source": STREAM, "columns": COLUMNS, "holdout": 3})
    report = build(loaded)
    assert report["streaming"] and report["rows_out"] == {"holdout": 3} and report["preview_rows"] == 16
    assert report["holdout_ids"] == ["00000.tar/000000", "00000.tar/000001", "00000.tar/000002"]
    data = built()
    assert set(data) == {"holdout", "preview"} and data["holdout"][0]["image"].size == (32, 32)
    assert (folder.dataset / "preview.png").is_file()
    assert build(loaded)["cached"]  # a second run with nothing changed skips it
    (shards / "00003.tar").touch()  # a shard changed (by its stat: shards are not hashed)
    assert not build(loaded)["cached"]


def _keys(rows, n: int) -> list[str]:
    """Rows' identities through their prompts and pixels (the shapes data's prompts repeat)."""
    return [r["prompt"] + str(np.asarray(r["image"]).sum()) for r in itertools.islice(rows, n)]


@pytest.mark.parametrize("shard_count", [4, 3])  # whole shards per rank, and every 2nd row
def test_two_ranks_read_disjoint_rows_that_cover_the_stream(recipe, tmp_path, shard_count):
    from recipe_runner.data.stream import StreamRows

    write_shapes_shards(tmp_path / "shards", rows=24, shards=shard_count, resolution=32)
    pattern = f"shards/{{00000..{shard_count - 1:05d}}}.tar"
    loaded = recipe({"source": {"webdataset": pattern, "shuffle_buffer": 5}, "columns": COLUMNS})
    one = _keys(StreamRows(loaded), 24)
    a, b = (_keys(StreamRows(loaded, rank, 2), 12) for rank in (0, 1))
    assert not set(a) & set(b) and sorted(a + b) == sorted(one)


@pytest.mark.parametrize("shuffle", [True, False])  # replayed order, and datasets' state_dict
def test_a_restored_position_continues_at_the_next_row(recipe, shards, shuffle):
    from recipe_runner.data.stream import StreamRows

    loaded = recipe({"source": {**STREAM, "shuffle_buffer": 5}, "columns": COLUMNS, "shuffle": shuffle})
    straight = StreamRows(loaded)
    rows = iter(straight)
    _keys(rows, 30)  # into the second epoch (24 rows each)
    position = json.loads(json.dumps(straight.position()))  # as a checkpoint stores it
    assert position["epoch"] == 1 and position["rows_read"] == 6
    assert ("state_dict" in position) is not shuffle
    expected = _keys(rows, 24)
    resumed = StreamRows(loaded)
    resumed.restore(position)
    assert _keys(iter(resumed), 24) == expected
    other = {"source": {**STREAM, "shuffle_buffer": 7}, "columns": COLUMNS, "shuffle": shuffle}
    if shuffle:  # a position counted in another order is refused, not continued elsewhere
        with pytest.raises(UserError, match="another order"):
            StreamRows(recipe(other)).restore(position)
    # Epochs differ in order when shuffled (datasets' set_epoch), and repeat when not.
    first_epoch = _keys(iter(StreamRows(loaded)), 24)
    assert (first_epoch[6:] == expected[:18]) is not shuffle


def test_held_out_rows_are_never_trained_on(recipe, build, shards):
    from recipe_runner.data.stream import StreamRows, row_identity

    loaded = recipe({"source": STREAM, "columns": COLUMNS, "holdout": 4})
    held = frozenset(build(loaded)["holdout_ids"])
    rows = StreamRows(loaded, exclude=held)
    seen = []
    for raw in rows.raw_rows():
        seen.append(row_identity(raw, "png"))
    assert held <= set(seen) and len(seen) == 24
    assert len(_keys(iter(rows), 40)) == 40  # 20 a epoch, epoch after epoch
    assert rows.epoch == 1


def test_a_stream_with_no_usable_rows_stops_with_a_message(recipe, tmp_path):
    from recipe_runner.data.stream import StreamRows

    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(3):
            for ext, data in (("png", b"not a png"), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loaded = recipe({"source": {"webdataset": "shards/00000.tar"}, "columns": COLUMNS})
    with pytest.raises(UserError) as info:
        next(iter(StreamRows(loaded)))
    assert "no rows to train on" in info.value.message and "3 dropped" in info.value.message


def test_a_bad_image_with_on_bad_image_error_names_the_shard_and_sample(recipe, shards):
    from recipe_runner.data.stream import StreamRows

    with tarfile.open(shards / "00000.tar", "a") as tar:  # a sample whose png is not an image
        for ext, data in (("png", b"not a png"), ("txt", b"caption")):
            info = tarfile.TarInfo(f"zzz.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loaded = recipe(
        {"source": STREAM, "columns": COLUMNS, "shuffle": False, "filters": {"on_bad_image": "error"}}
    )
    with pytest.raises(UserError) as info:
        list(itertools.islice(iter(StreamRows(loaded)), 30))
    assert "unreadable image" in info.value.message and "00000.tar" in info.value.message
    assert "sample 'zzz'" in info.value.message
    # Dropped (and counted) by default.
    rows = StreamRows(recipe({"source": STREAM, "columns": COLUMNS, "shuffle": False}))
    assert len(list(itertools.islice(iter(rows), 24))) == 24 and rows.dropped == 1


def test_a_run_folder_that_holds_a_shard_is_refused_one_beside_them_is_not(write_recipe, cli, tmp_path):
    """The shards are inputs; their folder is not: a recipe, its shards and runs/ side by side in one
    folder is the usual layout, and a run writes nothing that the pattern reads."""
    write_shapes_shards(tmp_path / "shards", rows=4, shards=1, resolution=32)
    text = "name: t\ndataset:\n  source: {webdataset: 'shards/00000.tar'}\n  columns: {image: png, prompt: txt}\n"
    holds = cli("validate", write_recipe(text + f"output: {{dir: {tmp_path / 'shards'}}}\n"))
    assert holds.exit_code == 2 and "holds a shard of dataset.source.webdataset" in holds.output
    beside = cli("validate", write_recipe(text + f"output: {{dir: {tmp_path / 'shards' / 'run'}}}\n"))
    assert beside.exit_code == 0, beside.output


def test_a_hub_source_with_streaming_true_streams(recipe, monkeypatch):
    """The hub path with `streaming: true` (no hub in tests: datasets.load_dataset gives a generated
    IterableDataset, as it would a hub stream's)."""
    import datasets
    from PIL import Image

    from recipe_runner.data.stream import StreamRows

    def rows():
        for i in range(6):
            yield {"picture": Image.new("RGB", (40, 48), (40 * i, 0, 0)), "text": f"row {i}"}

    features = datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")})
    calls = []

    def load_dataset(repo, **kw):
        calls.append((repo, kw))
        return datasets.IterableDataset.from_generator(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    loaded = recipe(
        {
            "source": {"hub": "owner/name", "streaming": True},
            "columns": {"image": "picture", "prompt": "text"},
            "shuffle": False,
        }
    )
    got = list(itertools.islice(iter(StreamRows(loaded)), 6))
    assert calls[0][0] == "owner/name" and calls[0][1]["streaming"] is True
    assert [r["prompt"] for r in got] == [f"row {i}" for i in range(6)]
    assert got[0]["image"].size == (32, 32) and got[0]["conditioning_image"].size == (32, 32)


def test_streamed_rows_are_the_built_rows_of_the_same_images(recipe, build, built, tmp_path):
    """The stream runs the dataset stage's own processing: the same images as an image folder, built,
    give the same pixels, conditions (canny, made on the fly) and prompts, row for row."""
    from recipe_runner.data.builtin_shapes import make_sample
    from recipe_runner.data.stream import StreamRows

    write_shapes_shards(tmp_path / "shards", rows=6, shards=2, resolution=48)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        sample = make_sample(i, seed=0, resolution=48)
        sample["image"].save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(sample["prompt"])
    build(recipe({"source": {"path": "images"}, "shuffle": False}))
    streamed = StreamRows(
        recipe({"source": {"webdataset": "shards/*.tar"}, "columns": COLUMNS, "shuffle": False})
    )
    for row, stream_row in zip(built()["train"], itertools.islice(iter(streamed), 6), strict=True):
        assert row["prompt"] == stream_row["prompt"]
        for column in ("image", "conditioning_image"):
            assert np.array_equal(np.asarray(row[column]), np.asarray(stream_row[column]))


def test_validate_and_plan_of_a_streaming_recipe_import_no_torch_or_datasets(write_recipe, tmp_path):
    write_shapes_shards(tmp_path / "shards", rows=4, shards=2, resolution=32)
    recipe = write_recipe(
        "name: t\ndataset:\n  source: {webdataset: 'shards/{00000..00001}.tar'}\n"
        "  columns: {image: png, prompt: txt}\n  resolution: 32\nmodel: {base: 'builtin:tiny-sd'}\n"
        "train: {max_steps: 2, batch_size: 2}\n"
    )
    (_, plan), heavy = cli_in_a_fresh_process(["validate", recipe], ["plan", recipe, "-o", tmp_path / "run"])
    assert heavy == [] and "streamed from 2 WebDataset shards" in plan.replace("\n", " ")
