"""Peak accelerator memory of a training step, traced on fake tensors: no GPU, no memory, seconds.

    python benchmarks/memory.py --arch sd15 --preset low-vram            # SD 1.5 at 512 px, batch 1
    python benchmarks/memory.py --arch sd15 --set train.batch_size=4 --modes reference,ours
    python benchmarks/memory.py --arch sdxl --preset low-vram            # 1024 px

The tracer is `recipe_runner.training.memory_trace` (also behind `recipe plan --trace`; its docstring says
what the figure is and what it leaves out). This script runs it on the benchmark recipes of train_speed.py,
on a full-size architecture (models/archs.py) or a builtin base, for one mode or the reference beside
ours, and puts `recipe plan`'s table-based estimate beside each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import torch  # noqa: E402
from train_speed import BUILTINS as ARCH_BASES  # noqa: E402  (the same CPU-sized bases)
from train_speed import table_head  # noqa: E402

import recipe_runner  # noqa: E402, F401  (before diffusers: it quiets bitsandbytes' import warning)
from recipe_runner.models.archs import ARCHS  # noqa: E402

MODES = ("reference", "ours")
HUB_IDS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
}


def trace(loaded, arch: str, workdir: Path, autocast_cache: bool | None = None) -> dict:
    """The recipe's step traced on `arch`: a builtin base's own configs, or a full-size architecture."""
    from recipe_runner.training import memory_trace

    if arch in ARCH_BASES:
        components, _ = memory_trace.recipe_components(loaded, workdir)
    else:
        components = memory_trace.arch_components(loaded, arch, workdir)
    return memory_trace.trace(loaded, components, autocast_cache)


def bench_recipe(root: Path, arch: str, preset: str | None, overrides: list[str], mode: str):
    """The recipe a training benchmark of `arch` would run (train_speed's base, preset and mode)."""
    from train_speed import BASE_RECIPE, MODE_OVERRIDES, preset_path

    from recipe_runner.recipe.loader import load_recipe

    spec = ARCHS.get(arch)
    family = spec.family if spec else "sd1"
    # A hub id of the family, never loaded: the traced models are built from the arch's configs, and
    # `recipe plan`'s estimate takes the family's published parameter counts from it.
    base = ARCH_BASES.get(arch) or HUB_IDS[family]
    resolution = spec.resolution if spec else 64
    text = BASE_RECIPE.format(
        rows=8, resolution=resolution, base=base, family=family, steps=2, precision="fp16"
    )
    (root / "bench-base.yaml").write_text(text)
    parents = ["bench-base.yaml"] + ([str(preset_path(preset))] if preset else [])
    (root / "recipe.yaml").write_text(f"extends: {json.dumps(parents)}\n")
    return load_recipe(root / "recipe.yaml", [*overrides, *MODE_OVERRIDES[mode]])


def plan_estimate(loaded) -> dict:
    """What `recipe plan` estimates for the same recipe (run/estimates.py, from parameter counts)."""
    from recipe_runner.run.estimates import estimate_memory

    return estimate_memory(loaded.recipe).to_dict()


def markdown(report: dict) -> str:
    modes = report["modes"]
    names = list(modes)

    def row(label: str, key: str) -> str:
        return f"| {label} | " + " | ".join(f"{modes[n][key]:.2f}" for n in names) + " |"

    title = (
        f"{report['arch']} @ {report['resolution']} px, batch {report['batch_size']} x "
        f"{report['gradient_accumulation_steps']}, {report['precision']}, preset {report['preset'] or 'none'}"
        f"{''.join(' --set ' + s for s in report['overrides'])}, autocast cache "
        f"{'on' if report['autocast_cache'] else 'off'}: traced on fake tensors (GiB)"
    )
    lines = [
        *table_head(title, names),
        row("**peak (traced)**", "peak_gb"),
        row("frozen weights", "frozen_weights_gb"),
        row("ControlNet weights (fp32)", "controlnet_weights_gb"),
        row("optimizer state", "optimizer_state_gb"),
        row("gradients + activations + temporaries", "gradients_activations_temporaries_gb"),
        *[
            f"| peak in {p} | " + " | ".join(f"{modes[n]['phases_gb'][p]:.2f}" for n in names) + " |"
            for p in ("inputs", "forward", "backward", "optimizer")
        ],
        "| `recipe plan` estimate (less its 1 GB CUDA overhead) | "
        + " | ".join(f"{modes[n]['plan']['total_gb'] - modes[n]['plan']['overhead_gb']:.2f}" for n in names)
        + " |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*ARCH_BASES, *ARCHS], default="sd15")
    parser.add_argument("--preset", help="a recipes/base/ preset (fast, low-vram) or a recipe file to extend")
    parser.add_argument(
        "--set", action="append", default=[], help="a recipe override, e.g. train.batch_size=4"
    )
    parser.add_argument("--modes", default="ours", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--autocast-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast's weight cache (default: as training sets it, features.AUTOCAST_CACHE)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    from recipe_runner.training.features import AUTOCAST_CACHE

    cache = AUTOCAST_CACHE if args.autocast_cache is None else args.autocast_cache
    report: dict = {
        "arch": args.arch,
        "preset": args.preset,
        "overrides": args.set,
        "autocast_cache": cache,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        root = Path(tmp)
        for mode in modes:
            loaded = bench_recipe(root, args.arch, args.preset, args.set, mode)
            result = trace(loaded, args.arch, root / "models", args.autocast_cache)
            result["plan"] = plan_estimate(loaded)
            report["modes"][mode] = result
        t = loaded.recipe.train
        report.update(
            resolution=loaded.recipe.dataset.resolution,
            batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            precision=t.mixed_precision,
            optimizer=t.optimizer,
            torch=torch.__version__,
        )
    from train_speed import emit

    return emit(report, markdown(report), args.json)


if __name__ == "__main__":
    main()
