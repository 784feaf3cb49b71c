"""Training speed: the reference loop (VAE + text encoder every step) against precomputed latents and text.

    python benchmarks/train_speed.py                          # tiny SD, 64 px, CPU-friendly
    python benchmarks/train_speed.py --arch sd15 --resolution 512 --batch-size 4   # on a GPU

Both modes run in this process on the same data and model, through the real training stage
(`train.precompute: false` / `true`). Reported after warm-up: steps/s, images/s, seconds per phase
(data, encode, forward, backward, optimizer), peak RSS and peak CUDA memory, the one-off precompute time
and after how many steps it has paid for itself. JSON (--json) plus a markdown table on stdout.
`--arch sd15` builds random-initialised Stable Diffusion 1.5-sized models from configs written below (no
download); the speed of random weights is the speed of trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a source checkout works too

# runwayml/stable-diffusion-v1-5's unet/config.json and vae/config.json, and CLIP ViT-L/14's text tower.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

RECIPE = """\
name: train-speed
seed: 0
dataset:
  source: {{builtin: shapes, num_samples: {rows}}}
  resolution: {resolution}
model:
  base: {base}
train:
  max_steps: {steps}
  batch_size: {batch_size}
  learning_rate: 1.0e-5
  mixed_precision: "{precision}"
  gradient_checkpointing: {checkpointing}
  precompute: {precompute}
  checkpoint_every: 1000000
  validation: {{every: 1000000, num_rows: 1, num_images: 1, num_inference_steps: 1, guidance_scale: 1.0}}
logging: {{tracker: none}}
"""


def build_sd15(folder: Path) -> Path:
    """A random-initialised SD 1.5-sized pipeline folder (the offline tiny tokenizer, CLIP-L-sized text)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    write_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **CLIP_L_TEXT,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            clip_sample=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_dataset(data_dir: Path, rows: int, resolution: int) -> None:
    from datasets import Dataset, DatasetDict, Image

    from recipe_runner.data.builtin_shapes import make_sample

    samples = [make_sample(i, seed=0, resolution=resolution) for i in range(rows)]
    columns = {k: [s[k] for s in samples] for k in ("image", "conditioning_image", "prompt")}
    train = (
        Dataset.from_dict(columns).cast_column("image", Image()).cast_column("conditioning_image", Image())
    )
    DatasetDict({"train": train}).save_to_disk(str(data_dir))


class PeakRSS:
    """Peak resident memory of this process while the block runs (ru_maxrss never goes down)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run_mode(root: Path, data: Path, base: str, args: argparse.Namespace, precompute: bool) -> dict:
    import shutil

    import torch

    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.folder import RunFolder
    from recipe_runner.training.stage import prepare_training, run_training

    name = "precompute" if precompute else "reference"
    recipe = root / f"{name}.yaml"
    recipe.write_text(
        RECIPE.format(
            rows=args.rows,
            resolution=args.resolution,
            base=base,
            steps=args.steps + 2,  # the loop leaves its first 2 steps out of the steady-state figures
            batch_size=args.batch_size,
            precision=args.precision,
            checkpointing=str(args.gradient_checkpointing).lower(),
            precompute=str(precompute).lower(),
        )
    )
    loaded, folder = load_recipe(recipe), RunFolder(root / name)
    shutil.copytree(data, folder.dataset_data)
    precompute_seconds = None
    if precompute:  # the one-off cost, timed on its own (train_controlnet would do it at setup)
        start = time.perf_counter()
        prepare_training(loaded, folder)
        precompute_seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        results = run_training(loaded, folder, profile=True)
    steps = max(1, results["steady_steps"])
    return {
        "mode": name,
        "steps_per_second": results["steps_per_second"],
        "images_per_second": results["images_per_second"],
        "ms_per_step": {k: 1000 * v / steps for k, v in sorted(results["phase_seconds"].items())},
        "measured_steps": results["steady_steps"],
        "final_loss": results["final_loss"],
        "peak_rss_mb": rss.peak / 2**20,
        "peak_cuda_mb": results["peak_memory_accelerator_mb"],
        "precompute_seconds": precompute_seconds,
    }


def markdown(report: dict) -> str:
    ref, pre = report["reference"], report["precompute"]
    phases = sorted(set(ref["ms_per_step"]) | set(pre["ms_per_step"]))
    rows = [
        ("steps/s", f"{ref['steps_per_second']:.2f}", f"{pre['steps_per_second']:.2f}"),
        ("images/s", f"{ref['images_per_second']:.1f}", f"{pre['images_per_second']:.1f}"),
        *[
            (f"ms/step {p}", f"{ref['ms_per_step'].get(p, 0):.1f}", f"{pre['ms_per_step'].get(p, 0):.1f}")
            for p in phases
        ],
        ("peak RSS (MiB)", f"{ref['peak_rss_mb']:.0f}", f"{pre['peak_rss_mb']:.0f}"),
        (
            "peak CUDA (MiB)",
            str(ref["peak_cuda_mb"] and round(ref["peak_cuda_mb"])),
            str(pre["peak_cuda_mb"] and round(pre["peak_cuda_mb"])),
        ),
        ("one-off precompute (s)", "-", f"{pre['precompute_seconds']:.2f}"),
    ]
    lines = [
        f"{report['arch']} @ {report['resolution']} px, batch {report['batch_size']}, {report['precision']}, "
        f"{report['device']}, {report['threads']} thread(s): precompute is {report['speedup']:.2f}x the "
        f"reference steps/s (pays for itself after {report['break_even_steps']} steps)",
        "",
        "| | reference (encode every step) | precompute |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=20, help="measured steps per mode, after 2 warm-up steps"
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep the run folders here (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (64 if args.arch == "tiny" else 512)
    if args.precision == "auto":
        args.precision = "fp16" if torch.cuda.is_available() else "no"
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RECIPE_RUNNER_CACHE", str(root / "cache"))
        base = "builtin:tiny-sd" if args.arch == "tiny" else str(build_sd15(root / "sd15-random"))
        data = root / "data"
        if not data.exists():
            write_dataset(data, args.rows, args.resolution)
        modes = {m: run_mode(root, data, base, args, m == "precompute") for m in ("reference", "precompute")}
    ref, pre = modes["reference"], modes["precompute"]
    saved_per_step = 1 / ref["steps_per_second"] - 1 / pre["steps_per_second"]
    report = {
        "arch": args.arch,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **modes,
        "speedup": pre["steps_per_second"] / ref["steps_per_second"],
        "break_even_steps": round(pre["precompute_seconds"] / saved_per_step) if saved_per_step > 0 else None,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
