"""run/plan.py and run/estimates.py without the CLI: row counts from file metadata, model sizes, estimates."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from recipe_runner.recipe.loader import load_recipe
from recipe_runner.run.estimates import estimate_memory, estimate_time, format_duration, model_size
from recipe_runner.run.plan import count_rows, training_steps


def loaded_with(tmp_path: Path, source: str, extra: str = "") -> object:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: x\ndataset: {{source: {source}, resolution: 64}}\nmodel: {{base: 'builtin:tiny-sd'}}\n{extra}"
    )
    return load_recipe(path)


def test_jsonl_metadata_of_an_image_folder(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png"}}\n' for i in range(7)))
    rows = count_rows(loaded_with(tmp_path, "{path: faces}"))
    assert rows.rows == 7 and "lines" in rows.how


def test_plain_image_folder_skips_conditioning_dir(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "cond").mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"")
        (folder / "cond" / f"{i}.png").write_bytes(b"")
    rows = count_rows(loaded_with(tmp_path, "{path: imgs, conditioning_dir: imgs/cond}"))
    assert rows.rows == 3


def test_csv_is_approximate_and_last_line_without_newline_counts(tmp_path):
    (tmp_path / "d.csv").write_text("image,prompt\na.png,x\nb.png,y")
    rows = count_rows(loaded_with(tmp_path, "{path: d.csv}"))
    assert rows.rows == 2 and rows.approximate


def test_parquet_rows_from_metadata(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image": ["a"] * 11, "prompt": ["p"] * 11}), tmp_path / "d.parquet")
    rows = count_rows(loaded_with(tmp_path, "{path: d.parquet}"))
    assert rows.rows == 11 and "parquet metadata" in rows.how


def test_hub_rows_are_unknown_and_steps_need_them(tmp_path):
    loaded = loaded_with(tmp_path, "{hub: fusing/fill50k}", "train: {max_steps: null, num_epochs: 1}\n")
    assert count_rows(loaded).rows is None
    assert training_steps(loaded.recipe, None) is None
    assert training_steps(loaded.recipe, 100) == 25  # effective batch 4 by default


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A header-only safetensors file: enough for counting parameters, no weights."""
    header = {k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}
    blob = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def test_local_model_sizes_come_from_safetensors_headers(tmp_path):
    model = tmp_path / "my-model"
    _safetensors(model / "unet" / "diffusion_pytorch_model.safetensors", {"a": [1000, 1000], "b": [10]})
    _safetensors(model / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"a": [1, 1]})  # a variant
    _safetensors(model / "text_encoder" / "model.safetensors", {"t": [100, 100]})
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ndataset: {source: {builtin: shapes}, resolution: 512}\nmodel: {base: ./my-model}\n"
    )
    sizes = model_size(load_recipe(path).recipe, tmp_path)
    assert sizes.unet == 1_000_010
    assert sizes.text_encoders == 10_000
    assert sizes.controlnet == pytest.approx(1_000_010 * 361 / 860)
    assert "safetensors" in sizes.source


def test_memory_estimate_of_sd15(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ndataset: {source: {hub: a/b}, resolution: 512}\nmodel: {base: stable-diffusion-v1-5/stable-diffusion-v1-5}\n"
        "train: {batch_size: 1, mixed_precision: fp16}\n"
    )
    recipe = load_recipe(path).recipe
    m = estimate_memory(recipe)
    assert m.frozen_unet_gb == pytest.approx(860e6 * 2 / 2**30)
    assert m.controlnet_training_gb == pytest.approx(361e6 * 12 / 2**30)  # fp32 weights + AdamW state
    # Batch 1 without checkpointing peaks in the backward pass: all gradients, 60% of the activations
    # (1.0 GB a 512 px image, plus autocast's half copies of the ControlNet's weights).
    assert m.gradients_gb == pytest.approx(361e6 * 4 / 2**30)
    assert m.activations_gb == pytest.approx(0.6 * (1.0 + 361e6 * 2 / 2**30))
    assert 8 < m.total_gb < 12 and m.fits() == 12
    t = estimate_time(recipe, 8000)
    assert t.seconds == pytest.approx(8000 / 8.0)  # 8 images/s, effective batch 1
    assert "A100" in t.assumption


def test_format_duration():
    assert format_duration(12) == "12 s"
    assert format_duration(600) == "10 min"
    assert format_duration(3 * 3600 + 15 * 60) == "3 h 15 min"
    assert format_duration(50 * 3600) == "2 d 2 h"


def test_saved_dataset_dict_counts_the_train_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    saved = tmp_path / "saved"
    for split, n in (("train", 5), ("holdout", 3)):
        (saved / split).mkdir(parents=True)
        (saved / split / "state.json").write_text("{}")
        table = pa.table({"prompt": ["p"] * n})
        path = str(saved / split / "data-00000-of-00001.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "holdout"]}')
    rows = count_rows(loaded_with(tmp_path, "{path: saved}"))
    assert rows.rows == 5 and "arrow" in rows.how


def test_the_cpu_time_of_the_demos_follows_their_bases(tmp_path):
    """`recipe plan` of the two demos: shapes-sd3's steps cost more than shapes-sd's (measured), and the
    assumption line says what a 64 px image costs."""
    repo = Path(__file__).resolve().parents[2]
    sd = estimate_time(load_recipe(repo / "recipes" / "demo.yaml").recipe, 600)
    sd3 = estimate_time(load_recipe(repo / "recipes" / "demo-sd3.yaml").recipe, 600)
    assert sd3.seconds > 2 * sd.seconds
    assert "6.1 ms per 64 px image" in sd.assumption and "6.1 ms" not in sd3.assumption


def test_a_transformer_s_activations_grow_with_its_image_tokens_not_its_text_tokens():
    from recipe_runner.families import FAMILIES

    assert FAMILIES["sd1"].figures.activation_scale(1024) == 4.0  # a UNet: with the pixels
    flux = FAMILIES["flux"].figures
    assert flux.activation_scale(512) == 1.0
    assert flux.activation_scale(1024) == pytest.approx((4096 + 512) / (1024 + 512))  # 3.0, not 4
    assert FAMILIES["sd3"].figures.activation_scale(1024) == pytest.approx((4096 + 154) / (1024 + 154))
