"""A user's bucketed run, end to end: non-square photos in, plan, run, sample at the bucket's size."""

from __future__ import annotations

import json

from PIL import Image, ImageDraw

RECIPE = """\
name: wide
dataset:
  source: {path: photos}
  resolution: 64
  buckets: {enabled: true, step: 16}
  holdout: 2
model:
  base: builtin:tiny-sd
train:
  max_steps: 4
  batch_size: 2
  checkpoint_every: 4
  validation: {every: 4, num_images: 1, num_rows: 2, num_inference_steps: 1, guidance_scale: 1.0}
logging: {tracker: none}
evaluate: {enabled: false}
"""


def _photos(root, sizes):
    root.mkdir()
    lines = []
    for i, size in enumerate(sizes):
        im = Image.new("RGB", size, (40 * i % 255, 90, 160))
        ImageDraw.Draw(im).ellipse((size[0] * 0.2, size[1] * 0.2, size[0] * 0.8, size[1] * 0.8), fill="red")
        im.save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "prompt": f"a red ellipse {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines))


def test_plan_run_and_sample_on_aspect_ratio_buckets(cli, write_recipe, tmp_path):
    _photos(tmp_path / "photos", [(150, 90), (90, 150), (70, 70), (160, 100)] * 3)
    recipe = write_recipe(RECIPE)
    out = tmp_path / "runs" / "wide"

    plan = cli("plan", recipe, "-o", out, "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["dataset"]["buckets"] == {"48x80": None, "64x64": None, "80x48": None}

    run = cli("run", recipe, "-o", out)
    assert run.exit_code == 0, run.output
    assert "aspect-ratio buckets (train rows)" in run.output
    assert "fewer rows than a batch" not in run.output  # batch 2: every bucket fills one
    report = json.loads((out / "dataset" / "report.json").read_text())
    assert sum(report["buckets"].values()) == report["rows_out"]["train"] == 10
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "samples" / "step-4.png").is_file()
    card = (out / "README.md").read_text()
    assert "80x48" in card

    plan = json.loads(cli("plan", recipe, "-o", out, "--json").output)
    counted = plan["dataset"]["buckets"]  # now from the built dataset; empty buckets show 0
    assert {k: n for k, n in counted.items() if n} == report["buckets"] and None not in counted.values()
    small = {k for k, n in counted.items() if n < 4}
    warnings = json.loads(cli("plan", recipe, "-o", out, "--set", "train.batch_size=4", "--json").output)[
        "warnings"
    ]
    [warned] = [w for w in warnings if "fewer rows than a batch of 4" in w]
    assert small and all(f"{k} ({counted[k]})" in warned for k in small)

    sample = cli("sample", out, "--condition", tmp_path / "photos" / "00.png", "--prompt", "an ellipse")
    assert sample.exit_code == 0, sample.output
    [made] = (out / "samples").glob("sample-*.png")
    assert Image.open(made).size == (80, 48)  # the landscape bucket, not a 64x64 square
