"""The one benchmark entry point: every measurement, as JSON plus a markdown table, with machine and date.

    python benchmarks/run.py                        # CPU: tiny model, 64 px (a few minutes)
    python benchmarks/run.py --arch sd15 --batch-size 4 --preset fast   # on a GPU
    python benchmarks/run.py --arch sdxl --batch-size 2 --preset fast --skip-dataset

Measures `recipe validate` start-up, dataset-build rows/s at 1 and 2 processes (and the cost of an
unchanged rebuild), training steps/s and images/s of the reference loop (VAE + text encoder every step,
as diffusers' train_controlnet.py) against our precomputed stage in the same process, time per phase,
peak host and accelerator memory, and FLOPs per image with model-FLOPs utilisation on a GPU. Ratios
are against the baseline measured in the same run; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from train_speed import BUILTINS  # noqa: E402

import recipe_runner  # noqa: E402, F401  (before diffusers: it quiets bitsandbytes' import warning)
from recipe_runner.models.archs import ARCHS  # noqa: E402


def validate_startup(runs: int = 5) -> dict:
    cmd = [sys.executable, "-m", "recipe_runner", "validate", "recipes/demo.yaml", "--quiet"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    probe = "import sys, recipe_runner.cli; print('torch' in sys.modules)"
    imports_torch = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    return {
        "median_seconds": round(statistics.median(times), 3),
        "imports_torch": imports_torch.stdout.strip(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*BUILTINS, *ARCHS], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's, else 4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", help="recipes/base/ preset for the training runs (fast, low-vram)")
    parser.add_argument("--skip-dataset", action="store_true", help="leave out the dataset-build benchmark")
    parser.add_argument("--rows", type=int, default=1000, help="rows for the dataset-build benchmark")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args(argv)

    import dataset_build
    import flops
    import torch
    import train_speed

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or 'x86_64'})"
    )
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": device, "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__},
        "validate_startup": validate_startup(),
    }
    if not args.skip_dataset:
        report["dataset_build"] = dataset_build.main(["--rows", str(args.rows), "--resolution", "64"])
    speed_args = ["--arch", args.arch, "--steps", str(args.steps), "--rounds", str(args.rounds)]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--preset", args.preset),
        ("--threads", args.threads),
    ):
        if value:
            speed_args += [flag, str(value)]
    report["train_speed"] = train_speed.main(speed_args)
    arch = {"tiny": "tiny-sd", "shapes": "shapes-sd"}.get(args.arch, args.arch)
    report["flops"] = flops.count(arch, report["train_speed"]["resolution"])
    per_image = report["flops"]["train_step_tflop_per_image"]
    ours = report["train_speed"]["modes"]["ours"]["images_per_second"]
    report["flops"]["mfu"] = flops.mfu(ours, per_image, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    t, f = r["train_speed"], r["flops"]
    modes = t["modes"]
    rows = [
        ("machine", f"{r['machine']['device']}, torch {r['versions']['torch']}"),
        ("date", r["date"]),
        (
            "`recipe validate` start-up",
            f"{r['validate_startup']['median_seconds']} s (torch imported: "
            f"{r['validate_startup']['imports_torch']})",
        ),
    ]
    if "dataset_build" in r:
        d = r["dataset_build"]
        rows += [
            ("dataset build, 1 process", f"{d['builds']['num_proc=1']['rows_per_second']} rows/s"),
            (
                "dataset build, 2 processes",
                f"{d['builds']['num_proc=2']['rows_per_second']} rows/s (×{d['speedup_num_proc_2_over_1']})",
            ),
            ("unchanged rebuild", f"{d['cache_hit_percent_of_first_build']}% of the first build"),
        ]
    setting = (
        f"{t['arch']} {t['resolution']} px, batch {t['batch_size']}x{t['gradient_accumulation_steps']}, "
        f"{t['precision']}, preset {t['preset'] or 'none'}"
    )
    for name, m in modes.items():
        memory = f", peak {m['peak_cuda_mb']:,.0f} MiB" if m["peak_cuda_mb"] is not None else ""
        rows.append(
            (
                f"train {setting}: {name}",
                f"{m['steps_per_second']:.2f} steps/s, {m['images_per_second']:.1f} images/s{memory}",
            )
        )
    if "speedup" in t:
        low, high = t["speedup_range"]
        rows.append(("ours / reference", f"×{t['speedup']:.2f} (rounds ×{low:.2f} to ×{high:.2f})"))
    rows += [
        (
            "FLOPs per image (step / VAE encode)",
            f"{f['train_step_tflop_per_image']:.4g} / {f['vae_encode_tflop_per_image']:.4g} TFLOP",
        ),
        ("MFU (ours)", "n/a (CPU)" if f.get("mfu") is None else f"{100 * f['mfu']:.1f}%"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])


if __name__ == "__main__":
    main()
