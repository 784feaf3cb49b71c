"""Training speed: diffusers' reference loop against our training stage, in the same process.

    python benchmarks/train_speed.py                                   # tiny SD, 64 px, CPU (~1 min)
    python benchmarks/train_speed.py --arch shapes --batch-size 32     # the demo's model and batch
    python benchmarks/train_speed.py --arch sd15 --batch-size 4 --preset fast        # on a GPU
    python benchmarks/train_speed.py --arch sd15 --preset low-vram --modes ours      # memory, batch 1
    python benchmarks/train_speed.py --arch sdxl --batch-size 2 --preset fast        # SDXL, 1024 px

Every mode runs the real training stage on the same model, data, resolution, batch and precision:
  reference   what diffusers' train_controlnet.py does with the same flags: the VAE and text encoder
              run every step (`precompute: false`), torch's default AdamW, no channels-last, no compile
  precompute  the reference plus latents and text encoded once: that part of the gain alone
  ours        our defaults plus the preset: precomputed, fused AdamW, channels-last/compile if set
Modes alternate over --rounds rounds, their order rotating, so a machine that slows down midway (a
shared CPU) weighs on all of them alike. Each figure is the median over rounds after 2 warm-up steps;
the speed-up is the median of the rounds' ours / reference ratios, with their range.
`--arch sd15`/`sdxl` build random-initialised full-size models (recipe_runner/models/archs.py; no download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # a source checkout works too
import recipe_runner  # noqa: E402, F401  (before diffusers: it quiets bitsandbytes' import warning)
from recipe_runner.models.archs import ARCHS  # noqa: E402

MODES = ("reference", "precompute", "ours")
# CPU-sized bases: random tiny SD (the tests'), and the demo's small pretrained one.
BUILTINS = {"tiny": "builtin:tiny-sd", "shapes": "builtin:shapes-sd"}
# The reference script's flags cover precision, checkpointing, 8-bit Adam, TF32 and xformers, so those
# stay as the preset sets them; these it has no flag for (or does otherwise) are set back to its way.
REFERENCE = [
    "train.fused_optimizer=false",
    "train.channels_last=false",
    "train.compile=false",
    "train.dataloader_num_workers=0",
]
MODE_OVERRIDES = {
    "reference": ["train.precompute=false", *REFERENCE],
    "precompute": ["train.precompute=true", *REFERENCE],
    "ours": ["train.precompute=true"],
}

BASE_RECIPE = """\
name: train-speed
seed: 0
dataset:
  source: {{builtin: shapes, num_samples: {rows}}}
  resolution: {resolution}
model:
  base: {base}
  family: {family}
train:
  max_steps: {steps}
  batch_size: 4
  learning_rate: 1.0e-5
  mixed_precision: "{precision}"
  checkpoint_every: 1000000
  validation: {{every: 1000000, num_rows: 1, num_images: 1, num_inference_steps: 1, guidance_scale: 1.0}}
logging: {{tracker: none}}
"""


def write_dataset(data_dir: Path, rows: int, resolution: int) -> None:
    """The built-dataset layout, written directly (the dataset stage has its own benchmark)."""
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


class Bench:
    """The work folder: one recipe file (base + preset), the dataset, one shared precompute cache."""

    def __init__(self, root: Path, args: argparse.Namespace, base: str, family: str):
        self.root, self.args = root, args
        (root / "bench-base.yaml").write_text(
            BASE_RECIPE.format(
                rows=args.rows,
                resolution=args.resolution,
                base=base,
                family=family,
                steps=args.steps + 2,  # the loop leaves its first 2 steps out of the steady-state figures
                precision=args.precision,
            )
        )
        parents = ["bench-base.yaml"] + ([str(preset_path(args.preset))] if args.preset else [])
        (root / "recipe.yaml").write_text(f"extends: {json.dumps(parents)}\n")
        self.data = root / f"data-{args.rows}-{args.resolution}"
        if not self.data.exists():
            write_dataset(self.data, args.rows, args.resolution)
        self.cache = root / "precompute-cache"
        self.cache.mkdir(exist_ok=True)

    def overrides(self, mode: str) -> list[str]:
        explicit = [f"train.batch_size={self.args.batch_size}"] if self.args.batch_size else []
        if self.args.gradient_checkpointing is not None:
            explicit.append(f"train.gradient_checkpointing={str(self.args.gradient_checkpointing).lower()}")
        variant = getattr(self.args, "variants", {}).get(mode)
        mode_sets = MODE_OVERRIDES["ours"] + variant if variant is not None else MODE_OVERRIDES[mode]
        return [*explicit, *self.args.set, *mode_sets]

    def recipe(self, mode: str):
        from recipe_runner.recipe.loader import load_recipe

        return load_recipe(self.root / "recipe.yaml", self.overrides(mode))

    def folder(self, mode: str):
        from recipe_runner.runfolder.layout import RunFolder

        loaded = self.recipe(mode)
        folder = RunFolder(Path(tempfile.mkdtemp(prefix=f"run-{mode}-", dir=self.root)))
        shutil.copytree(self.data, folder.dataset_data)
        folder.cache.symlink_to(self.cache, target_is_directory=True)
        return loaded, folder

    def precompute_seconds(self) -> float:
        """The one-off encoding of the dataset, timed on its own (the reference pays it at every step)."""
        from recipe_runner.training.stage import prepare_training

        loaded, folder = self.folder("ours")
        start = time.perf_counter()
        prepare_training(loaded, folder)
        return time.perf_counter() - start

    def run(self, mode: str) -> dict:
        import torch

        from recipe_runner.training.stage import run_training

        loaded, folder = self.folder(mode)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            results = run_training(loaded, folder, profile=True)
        shutil.rmtree(folder.root, ignore_errors=True)
        steps = max(1, results["steady_steps"])
        return {
            "steps_per_second": results["steps_per_second"],
            "images_per_second": results["images_per_second"],
            "images_per_step": results["images_per_step"],
            "ms_per_step": {k: 1000 * v / steps for k, v in sorted(results["phase_seconds"].items())},
            "final_loss": results["final_loss"],
            "peak_rss_mb": rss.peak / 2**20,
            "peak_cuda_mb": results["peak_memory_accelerator_mb"],
        }


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    shipped = HERE.parent / "recipes" / "base" / f"{name}.yaml"
    if not shipped.is_file():
        raise SystemExit(f"--preset: no {shipped} (and {name!r} is not a recipe file)")
    return shipped


def summarise(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per mode: medians over rounds of the rates and of each phase, the maxima of memory."""
    out = {}
    for mode in rounds[0]:
        runs = [r[mode] for r in rounds]
        phases = sorted({p for run in runs for p in run["ms_per_step"]})
        cuda = [run["peak_cuda_mb"] for run in runs if run["peak_cuda_mb"] is not None]
        out[mode] = {
            "steps_per_second": statistics.median(run["steps_per_second"] for run in runs),
            "images_per_second": statistics.median(run["images_per_second"] for run in runs),
            "images_per_step": runs[0]["images_per_step"],
            "per_round_steps_per_second": [round(run["steps_per_second"], 3) for run in runs],
            "ms_per_step": {
                p: statistics.median(run["ms_per_step"].get(p, 0.0) for run in runs) for p in phases
            },
            "final_loss": runs[-1]["final_loss"],
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "peak_cuda_mb": max(cuda) if cuda else None,
        }
    return out


def markdown(report: dict) -> str:
    modes = report["modes"]
    names = list(modes)
    phases = sorted({p for m in modes.values() for p in m["ms_per_step"]})

    def row(label: str, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(modes[n]) for n in names) + " |"

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    title = (
        f"{report['arch']} @ {report['resolution']} px, batch {report['batch_size']} x "
        f"{report['gradient_accumulation_steps']} accumulated, {report['precision']}, preset "
        f"{report['preset'] or 'none'}, {report['device']}, {report['threads']} thread(s), "
        f"{report['rounds']} round(s)"
    )
    lines = [
        *table_head(title, names),
        row("steps/s (median)", lambda m: f"{m['steps_per_second']:.3f}"),
        row("images/s", lambda m: f"{m['images_per_second']:.1f}"),
        row("per round, steps/s", lambda m: ", ".join(f"{v:.2f}" for v in m["per_round_steps_per_second"])),
        *[row(f"ms/step {p}", lambda m, p=p: f"{m['ms_per_step'].get(p, 0.0):.1f}") for p in phases],
        row("peak RSS (MiB)", lambda m: mib(m["peak_rss_mb"])),
        row("peak accelerator memory (MiB)", lambda m: mib(m["peak_cuda_mb"])),
    ]
    if "speedup" in report:
        low, high = report["speedup_range"]
        lines += [
            "",
            f"**ours / reference: ×{report['speedup']:.2f}** (median of rounds; ×{low:.2f} to ×{high:.2f})"
            + "".join(f"; {k} ×{v:.2f}" for k, v in report.get("attribution", {}).items()),
        ]
    if report.get("variant_ratios") and "speedup" not in report:
        lines.append("")
    for name, r in (report.get("variant_ratios") or {}).items():
        sets = "; ".join(report["variants"][name])
        lines.append(
            f"**{name} ({sets}) / ours: ×{r['ratio']:.3f}** (median of rounds; ×{r['range'][0]:.3f} to "
            f"×{r['range'][1]:.3f})"
        )
    if report.get("precompute_seconds") is not None:
        lines.append(
            f"one-off precompute of {report['rows']} rows: {report['precompute_seconds']:.2f} s"
            + (
                f", paid back after {report['break_even_steps']} steps"
                if report.get("break_even_steps")
                else ""
            )
        )
    return "\n".join(lines)


def _ratios(report: dict, rounds: list[dict[str, dict]]) -> None:
    modes = report["modes"]
    for name in report.get("variants") or {}:
        per_round = [r[name]["steps_per_second"] / r["ours"]["steps_per_second"] for r in rounds]
        report.setdefault("variant_ratios", {})[name] = {
            "ratio": statistics.median(per_round),
            "range": [min(per_round), max(per_round)],
        }
    if "reference" not in modes or "ours" not in modes:
        return
    ref, ours = modes["reference"], modes["ours"]
    # Paired: the two runs of a round are minutes apart at most, so a slower machine cancels out.
    per_round = [r["ours"]["steps_per_second"] / r["reference"]["steps_per_second"] for r in rounds]
    report["speedup"] = statistics.median(per_round)
    report["speedup_range"] = [min(per_round), max(per_round)]
    if "precompute" in modes:
        pre = modes["precompute"]["steps_per_second"]
        report["attribution"] = {
            "precompute alone": pre / ref["steps_per_second"],
            "the rest (fused AdamW, preset)": ours["steps_per_second"] / pre,
        }
    saved = 1 / ref["steps_per_second"] - 1 / ours["steps_per_second"]
    seconds = report.get("precompute_seconds")
    report["break_even_steps"] = round(seconds / saved) if seconds and saved > 0 else None


def main(argv: list[str] | None = None) -> dict:
    from recipe_runner.errors import UserError

    try:
        return _main(argv)
    except UserError as e:  # a bad --set or preset: the message, as the CLI would print it
        problems = getattr(e, "problems", None) or []
        details = "".join(f"\n  {p.file or ''} {p.path}: {p.message}" for p in problems)
        raise SystemExit(f"train_speed: {e}{details}" + (f"\n  hint: {e.hint}" if e.hint else "")) from None


def _main(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*BUILTINS, *ARCHS], default="tiny")
    parser.add_argument("--resolution", type=int, help="default: 64 (tiny), 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--batch-size", type=int, help="default: the preset's, else 4")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each mode, alternating")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--preset", help="a recipes/base/ preset (fast, low-vram) or a recipe file to extend")
    parser.add_argument("--set", action="append", default=[], help="a recipe override for every mode")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=SET[;SET...]: one more mode, ours with these overrides, e.g. ema=train.ema_decay=0.999 "
        "(reported as a ratio to ours)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep the data and models here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    args.variants = {}
    for text in args.variant:
        name, _, sets = text.partition("=")
        if not name or not sets or name in MODES or name in args.variants:
            parser.error(
                f"--variant {text!r}: write NAME=SET[;SET...] with a new name, e.g. ema=train.ema_decay=0.999"
            )
        args.variants[name] = [s.strip() for s in sets.split(";") if s.strip()]
    if args.variants and "ours" not in modes:
        modes.append("ours")  # what a variant is compared with
    modes += list(args.variants)

    import torch

    from recipe_runner.families.offline import build_random_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (ARCHS[args.arch].resolution if args.arch in ARCHS else 64)
    if args.precision == "auto":
        args.precision = "fp16" if torch.cuda.is_available() else "no"
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RECIPE_RUNNER_CACHE", str(root / "models"))
        if args.arch in BUILTINS:
            base, family = BUILTINS[args.arch], "sd1"
        else:
            base, family = (
                str(build_random_pipeline(root / f"{args.arch}-random", args.arch)),
                ARCHS[args.arch].family,
            )
        bench = Bench(root, args, base, family)
        precompute_seconds = bench.precompute_seconds() if {"precompute", "ours"} & set(modes) else None
        for name in args.variants:
            bench.recipe(name)  # a bad override fails here, before any run
        rounds = []
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            done = {mode: bench.run(mode) for mode in order}
            rounds.append({mode: done[mode] for mode in modes})
        settings = bench.recipe("ours").recipe.train
    report = {
        "arch": args.arch,
        "resolution": args.resolution,
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "precision": settings.mixed_precision,
        "preset": args.preset,
        "overrides": args.set,
        "variants": args.variants,
        "rows": args.rows,
        "rounds": args.rounds,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "precompute_seconds": precompute_seconds,
        "modes": summarise(rounds),
    }
    _ratios(report, rounds)
    return emit(report, markdown(report), args.json)


def table_head(title: str, columns: list[str]) -> list[str]:
    """A benchmark table's first lines: its title, then a header with one column per mode."""
    return [title, "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def emit(report: dict, table: str, path: Path | None) -> dict:
    """A benchmark's report: JSON on stdout (and in `path`), then its markdown table."""
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print(table)
    return report


if __name__ == "__main__":
    main()
