"""diffusers' own ControlNet example scripts against `recipe run`, as whole processes, side by side.

    git -C DIFFUSERS show COMMIT:examples/controlnet/train_controlnet_sd3.py > /tmp/dx/train_controlnet_sd3.py
    (the same for train_controlnet_flux.py and train_controlnet.py; `git rev-parse COMMIT > /tmp/dx/COMMIT`)
    python benchmarks/vs_diffusers.py --diffusers-examples /tmp/dx     # sd3 + flux, 3 rounds of 300 steps
    python benchmarks/vs_diffusers.py --diffusers-examples /tmp/dx --rounds 1 --steps 20     # a smoke test
    python benchmarks/vs_diffusers.py --diffusers-examples /tmp/dx --families sd1 --rows 256 \
        --learning-rate 1e-4                                  # the tiny SD model
    python benchmarks/vs_diffusers.py --diffusers-examples /tmp/dx --families shapes-sd --batch-size 32 \
        --rows 2048 --learning-rate 1e-3 --steps 100          # the demo's model and settings

On this project's 2-core CPU, alone, one round of sd3 and flux at 300 steps should take about 4.5 minutes
(estimated from 6- and 20-step runs: about 20 s of each process outside the loop, then the step rates).

Families and scripts: `sd3` train_controlnet_sd3.py, `flux` train_controlnet_flux.py, `sd1` and
`shapes-sd` train_controlnet.py. Both tools train from the same local model folder, built here (random
tiny models with the real architectures, written by build_models into the work folder): SD3 and FLUX.1 as
recipe_runner/models/tiny.py's builtins plus a tiny T5 encoder with a T5TokenizerFast (the scripts
load T5 with that class; SD3's always loads a T5), and SD3's transformer with 13 blocks instead of 3
(train_controlnet_sd3.py has no flag for the ControlNet's depth and always copies 12 blocks, which
needs 13: the last block has no text stream to copy); sd1 is `builtin:tiny-sd` as it is, shapes-sd the
demo's `builtin:shapes-sd` (pretrained from the repo's weights). The same rows
of the builtin shapes data (one parquet file for recipe-runner and sd3/sd1's --train_data_dir; PNGs
and a jsonl for flux's --jsonl_for_train), resolution, batch, steps, learning rate (constant, no
warm-up), seed, fp32, one process on the CPU, gradient accumulation 1, logit-normal timesteps, no
checkpoints within the steps, TensorBoard logging of loss and lr every step in both, no validation:
the scripts get no --validation_prompt; recipe-runner always samples one grid at the end, made here as
small as it goes (1 image, 1 denoising step) and counted in its time outside the loop, as is the
resumable checkpoint it always writes at the end. Each tool keeps its own defaults otherwise; in
particular recipe-runner precomputes the VAE latents (and, like the SD3 and Flux scripts, the text
embeddings) once before training, where the scripts encode every batch with the VAE at every step
(train_controlnet.py also the prompts): that is what is compared, along with fused AdamW and its
other defaults. Every run is cold: a new output folder and an empty datasets cache.

Measured per run, in a child process started by this one (`python SCRIPT.py ...` for diffusers,
`python -m recipe_runner run ...` for ours, each under benchmarks/step_clock.py, which records when the
program's own per-step progress bar advances, patching nothing else):
  wall      the whole process, from its start to its exit (interpreter, imports, loading, data,
            precompute, training, saving)
  steps/s   the step loop's steady rate: (steps - 2) / (time of the last step - time of step 2), the
            same 2 warm-up steps left out for both tools, each step timed to its progress-bar update
  outside   wall - (last step - the progress bar's creation just before the loop): everything but the
            loop (the warm-up steps are inside it)
  peak RSS  the child's own ru_maxrss, through benchmarks/own_usage.py (started from this process, it
            would report at least this process's RSS: Linux carries it into a child across fork and exec)
Run it alone on the machine. Beside other jobs the figures mean little: recipe-runner sleeps its
OpenMP threads (OMP_WAIT_POLICY=PASSIVE) when the CPU is busy as it starts, where the scripts' spinning
threads slowed 15-20x here beside two other engineers' jobs. Each run records the share of the CPU
other processes took meanwhile and the policy it ran with, and the table says when either matters;
`--env OMP_WAIT_POLICY=PASSIVE` pins the policy for both.
Tools alternate within each round (ours first in even rounds, diffusers' first in odd ones), so a
machine that slows down for a while weighs on both. Ratios are ours / diffusers' per round (paired),
reported as the median over rounds with their range; steps/s above 1 is faster, the others below 1 is
less. JSON goes to benchmarks/results/vs-diffusers.json and the markdown table beside it (--json,
--markdown), both printed too. recipe-runner's own steady rate (its run summary) is recorded beside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # a source checkout works too

WARMUP_STEPS = 2  # as recipe_runner/training/loop.py leaves out of its steady rate
TOOLS = ("ours", "diffusers")
SD3_BLOCKS = 13  # train_controlnet_sd3.py's ControlNet copies 12 blocks, and never the transformer's last
T5 = {"d_model": 64, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}  # tiny-flux's T5, any vocab
T5_TOKENS = 77  # train_controlnet_sd3.py's --max_sequence_length, and recipe-runner's for SD3


@dataclass(frozen=True)
class Family:
    script: str  # in --diffusers-examples
    family: str  # model.family
    model: dict  # model: keys for the recipe besides base and family
    flags: tuple[str, ...]  # the script's flags for the same model and loss
    builtin: str | None = None  # a recipe_runner builtin model, built as it is (no T5 added)
    controlnet: bool = False  # both start from one ControlNet written beside the model (start_controlnet)


FAMILIES: dict[str, Family] = {
    "sd3": Family(
        "train_controlnet_sd3.py",
        "sd3",
        {"t5": True, "controlnet_layers": 12},
        ("--weighting_scheme", "logit_normal", "--precondition_outputs", "1"),
    ),
    "flux": Family(
        "train_controlnet_flux.py",
        "flux",
        {"controlnet_layers": 1, "controlnet_single_layers": 1},  # tiny-flux has 1 of each
        (
            *("--weighting_scheme", "logit_normal", "--guidance_scale", "3.5"),
            *("--num_double_layers", "1", "--num_single_layers", "1"),
        ),
    ),
    "sd1": Family("train_controlnet.py", "sd1", {}, (), builtin="tiny-sd"),
    # The demo's model (recipes/demo.yaml); its settings: --batch-size 32 --rows 2048 --learning-rate 1e-3.
    # Its VAE shrinks 4x, and the script's ControlNet.from_unet embeds conditioning images 8x smaller:
    # both train the ControlNet start_controlnet writes, as recipe-runner makes it for this base.
    "shapes-sd": Family("train_controlnet.py", "sd1", {}, (), builtin="shapes-sd", controlnet=True),
}


# --- models ---------------------------------------------------------------------------------------


def t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast (Unigram) built offline: the shapes prompts' words whole, any other text by
    letter; <pad> 0, </s> 1, <unk> 2 as T5's."""
    from transformers import T5TokenizerFast

    from recipe_runner.data.builtin_shapes import PROMPT_WORDS
    from recipe_runner.models.tokenizer import COMMON_WORDS

    words = dict.fromkeys(w.lower() for w in (*PROMPT_WORDS, *COMMON_WORDS))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -1.0) for w in words]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'-"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _add_t5(folder: Path, tokenizer_dir: str, encoder_dir: str, seed: int) -> None:
    """Write a T5 tokenizer and a tiny T5 encoder into `folder` and name them in model_index.json."""
    import torch
    from transformers import T5Config, T5EncoderModel

    for name in (tokenizer_dir, encoder_dir):
        shutil.rmtree(folder / name, ignore_errors=True)
    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(folder / tokenizer_dir)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5)).save_pretrained(
        folder / encoder_dir, safe_serialization=True
    )
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[tokenizer_dir] = ["transformers", "T5TokenizerFast"]
    index[encoder_dir] = ["transformers", "T5EncoderModel"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def build_sd3(folder: Path, seed: int = 0) -> Path:
    """builtin:tiny-sd3 with a T5 (text_encoder_3, tokenizer_3) and a transformer of SD3_BLOCKS blocks."""
    import torch
    from diffusers import SD3Transformer2DModel

    from recipe_runner.models.tiny import build_tiny_sd3

    build_tiny_sd3(folder, seed=seed)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | {"num_layers": SD3_BLOCKS}
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(seed)
    SD3Transformer2DModel.from_config(config).save_pretrained(folder / "transformer", safe_serialization=True)
    _add_t5(folder, "tokenizer_3", "text_encoder_3", seed + 2)
    return folder


def build_flux(folder: Path, seed: int = 0) -> Path:
    """builtin:tiny-flux with a T5TokenizerFast in tokenizer_2 (and its T5 sized to that vocabulary)."""
    from recipe_runner.models.tiny import build_tiny_flux

    build_tiny_flux(folder, seed=seed)
    _add_t5(folder, "tokenizer_2", "text_encoder_2", seed + 1)
    return folder


def build_models(root: Path, families: list[str], seed: int = 0) -> dict[str, Path]:
    """Each family's model folder under `root`, built once (a folder with model_index.json is reused)."""
    from recipe_runner.models.tiny import resolve_builtin

    builders = {"sd3": build_sd3, "flux": build_flux}
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in families:
        builtin = FAMILIES[name].builtin
        if builtin is not None:
            out[name] = resolve_builtin(builtin, root)
            if FAMILIES[name].controlnet:
                start_controlnet(out[name], seed)
            continue
        folder = root / f"{name}-t5"
        if not (folder / "model_index.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            builders[name](tmp, seed)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        out[name] = folder
    return out


def start_controlnet(model: Path, seed: int) -> Path:
    """A new ControlNet for the SD model in `model`, written to `model`/../NAME-controlnet (once): from
    its UNet, seeded, with the conditioning embedding recipe-runner gives a new ControlNet for its VAE
    (families.stable_diffusion.new_controlnet, when model.controlnet is null)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from recipe_runner.families.stable_diffusion import conditioning_embedding_channels

    out = controlnet_folder(model)
    if (out / "config.json").is_file():
        return out
    vae = AutoencoderKL.load_config(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    torch.manual_seed(seed)
    channels = conditioning_embedding_channels(2 ** (len(vae["block_out_channels"]) - 1))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    tmp = Path(tempfile.mkdtemp(prefix=".controlnet-", dir=out.parent))
    controlnet.save_pretrained(tmp)
    tmp.rename(out)
    return out


def controlnet_folder(model: Path) -> Path:
    return model.parent / f"{model.name}-controlnet"


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPaths:
    parquet_dir: Path  # one train.parquet: image, conditioning_image (images), text
    jsonl: Path  # the same rows: image and conditioning_image as PNG paths, text


def write_data(root: Path, rows: int, resolution: int, seed: int = 0) -> DataPaths:
    """`rows` rows of the builtin shapes data at `resolution`, in the layouts both tools read."""
    from datasets import Dataset, Features, Image, Value

    from recipe_runner.data.builtin_shapes import make_sample

    paths = DataPaths(root / "parquet", root / "train.jsonl")
    if (paths.parquet_dir / "train.parquet").is_file() and paths.jsonl.is_file():
        return paths
    samples = [make_sample(i, seed=seed, resolution=resolution) for i in range(rows)]
    features = Features({"image": Image(), "conditioning_image": Image(), "text": Value("string")})
    columns = {
        "image": [s["image"] for s in samples],
        "conditioning_image": [s["conditioning_image"] for s in samples],
        "text": [s["prompt"] for s in samples],
    }
    paths.parquet_dir.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(paths.parquet_dir / "train.parquet"))
    lines = []
    for kind in ("image", "conditioning_image"):
        (root / kind).mkdir(exist_ok=True)
    for i, s in enumerate(samples):
        row = {"text": s["prompt"]}
        for kind in ("image", "conditioning_image"):
            path = root / kind / f"{i:05d}.png"
            s[kind].save(path)
            row[kind] = str(path)
        lines.append(json.dumps({k: row[k] for k in ("image", "conditioning_image", "text")}))
    paths.jsonl.write_text("\n".join(lines) + "\n")
    return paths


# --- the two command lines ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    steps: int
    resolution: int
    batch_size: int
    learning_rate: float
    seed: int


def diffusers_args(name: str, model: Path, data: DataPaths, out: Path, cache: Path, s: Settings) -> list[str]:
    """The example script's flags for this comparison (its script path not included)."""
    family = FAMILIES[name]
    data_flag = (
        ["--jsonl_for_train", str(data.jsonl)]
        if name == "flux"
        else ["--train_data_dir", str(data.parquet_dir)]
    )
    return [
        "--pretrained_model_name_or_path", str(model),
        "--output_dir", str(out),
        "--cache_dir", str(cache),
        *data_flag,
        "--image_column", "image",
        "--conditioning_image_column", "conditioning_image",
        "--caption_column", "text",
        "--resolution", str(s.resolution),
        "--train_batch_size", str(s.batch_size),
        "--max_train_steps", str(s.steps),
        "--learning_rate", repr(s.learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--gradient_accumulation_steps", "1",
        "--mixed_precision", "no",
        "--seed", str(s.seed),
        "--checkpointing_steps", str(10 * s.steps + 1_000_000),
        "--dataloader_num_workers", "0",
        "--report_to", "tensorboard",
        *(["--max_sequence_length", str(T5_TOKENS)] if name == "sd3" else []),
        *(["--controlnet_model_name_or_path", str(controlnet_folder(model))] if family.controlnet else []),
        *family.flags,
    ]  # fmt: skip


def recipe_yaml(name: str, model: Path, data: DataPaths, s: Settings) -> str:
    """The recipe for the same training (JSON is YAML: every value spelled out)."""
    family = FAMILIES[name]
    recipe = {
        "name": f"vs-diffusers-{name}",
        "seed": s.seed,
        "dataset": {
            "source": {"path": str(data.parquet_dir / "train.parquet"), "format": "parquet"},
            "columns": {"image": "image", "conditioning_image": "conditioning_image", "prompt": "text"},
            "resolution": s.resolution,
        },
        "model": {
            "base": str(model),
            "family": family.family,
            **family.model,
            **({"controlnet": str(controlnet_folder(model))} if family.controlnet else {}),
        },
        "train": {
            "max_steps": s.steps,
            "batch_size": s.batch_size,
            "gradient_accumulation_steps": 1,
            "learning_rate": s.learning_rate,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "mixed_precision": "no",
            "checkpoint_every": 10 * s.steps + 1_000_000,
            "dataloader_num_workers": 0,
            # Never within the steps; the one at the end, as small as it goes.
            "validation": {
                "every": 10 * s.steps + 1_000_000,
                "num_rows": 1,
                "num_images": 1,
                "num_inference_steps": 1,
                "guidance_scale": 1.0,
            },
            **({"flow_matching": {"weighting_scheme": "logit_normal"}} if family.family != "sd1" else {}),
        },
        "logging": {"tracker": "tensorboard", "every": 1},  # as the scripts: loss and lr at every step
        "evaluate": {"enabled": False},
    }
    return json.dumps(recipe, indent=2) + "\n"


# --- one run --------------------------------------------------------------------------------------


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict:
    """Run `cmd` (under step_clock.py) to its end; wall time, peak RSS, exit status and its step clock."""
    clock_file, usage_file = cwd / "step-clock.json", cwd / "own-usage.json"
    full = [sys.executable, str(HERE / "step_clock.py"), str(clock_file), *cmd]
    from recipe_runner.cli.process import busy_cpu_seconds

    busy_before = busy_cpu_seconds()
    with log.open("wb") as out:
        # Through own_usage.py: a child of this process would report at least this process's own RSS.
        launcher = [sys.executable, str(HERE / "own_usage.py"), str(usage_file), *full]
        code = subprocess.run(launcher, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"vs_diffusers: exit {code}: {' '.join(full)}\n  " + "\n  ".join(tail))
    usage = json.loads(usage_file.read_text())
    start, wall = usage["started"], usage["ended"] - usage["started"]
    others = busy_cpu_seconds() - busy_before - usage["cpu_s"]
    clock = json.loads(clock_file.read_text())
    steps = clock["steps"]
    if len(steps) <= WARMUP_STEPS or clock["loop_start"] is None:
        raise SystemExit(f"vs_diffusers: no step loop seen in {' '.join(full)} (see {log})")
    loop = steps[-1] - clock["loop_start"]
    return {
        "wall_s": wall,
        "steps_per_second": (len(steps) - WARMUP_STEPS) / (steps[-1] - steps[WARMUP_STEPS - 1]),
        "loop_s": loop,
        "outside_s": wall - loop,
        "before_loop_s": clock["loop_start"] - start,
        "after_loop_s": start + wall - steps[-1],
        "peak_rss_mb": usage["peak_rss_kib"] / 1024,
        "steps": len(steps),
        # CPU time other processes used meanwhile, as a share of the machine: contention
        "others_cpu_share": max(0.0, others) / (wall * (os.cpu_count() or 1)),
        "omp_wait_policy": clock.get("omp_wait_policy"),
    }


class Bench:
    """The work folder: models, data, and one fresh folder per run."""

    def __init__(self, root: Path, args: argparse.Namespace):
        self.root, self.args = root, args
        self.settings = Settings(args.steps, args.resolution, args.batch_size, args.learning_rate, args.seed)
        self.models = build_models(root / "models", args.families, args.seed)
        self.data = write_data(root / f"data-{args.rows}-{args.resolution}", args.rows, args.resolution)
        self.examples = args.diffusers_examples.resolve()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(args.threads),
            **dict(kv.split("=", 1) for kv in args.env),
        }

    def run(self, name: str, tool: str, index: int) -> dict:
        folder = self.root / "runs" / f"{name}-{tool}-{index}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        env = {**self.env, "HF_DATASETS_CACHE": str(folder / "datasets-cache")}
        log = self.root / "logs" / f"{name}-{tool}-{index}.log"
        log.parent.mkdir(exist_ok=True)
        if tool == "ours":
            recipe = recipe_yaml(name, self.models[name], self.data, self.settings)
            (folder / "recipe.yaml").write_text(recipe)
            cmd = ["-m", "recipe_runner", "run", "recipe.yaml", "-o", str(folder / "run")]
        else:
            script = self.examples / FAMILIES[name].script
            flags = diffusers_args(
                name, self.models[name], self.data, folder / "out", folder / "datasets-cache", self.settings
            )
            cmd = [str(script), *flags]
        result = run_child(cmd, env, folder, log)
        if tool == "ours":
            lock = json.loads((folder / "run" / "run.lock.json").read_text())
            stages = lock["stages"]
            result["own_steps_per_second"] = stages["train"]["steps_per_second"]
            result["stage_seconds"] = {k: v.get("seconds") for k, v in stages.items()}
        if not self.args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return result


# --- report ---------------------------------------------------------------------------------------

METRICS = ("wall_s", "steps_per_second", "outside_s", "peak_rss_mb")


def summarise(runs: list[dict[str, dict]]) -> dict:
    """Per tool the medians over rounds; per metric the paired ours / diffusers ratios."""
    out: dict = {tool: {} for tool in TOOLS}
    for tool in TOOLS:
        for m in (*METRICS, "loop_s", "before_loop_s", "after_loop_s"):
            out[tool][m] = statistics.median(r[tool][m] for r in runs)
        out[tool]["per_round_steps_per_second"] = [round(r[tool]["steps_per_second"], 3) for r in runs]
    own = [r["ours"]["own_steps_per_second"] for r in runs if r["ours"].get("own_steps_per_second")]
    out["ours"]["own_steps_per_second"] = statistics.median(own) if own else None
    out["ratios"] = {}
    for m in METRICS:
        per_round = [r["ours"][m] / r["diffusers"][m] for r in runs]
        out["ratios"][m] = {
            "median": statistics.median(per_round),
            "range": [min(per_round), max(per_round)],
            "per_round": [round(v, 3) for v in per_round],
        }
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"diffusers {report['diffusers_version']} example scripts at {report['diffusers_commit'][:10]} vs "
        f"recipe-runner {report['recipe_runner_version']} ({report['recipe_runner_commit'][:10]}): "
        f"{s['resolution']} px, batch {s['batch_size']}, {s['steps']} steps, lr {s['learning_rate']:g} "
        f"constant, fp32, {report['device']}, {s['threads']} thread(s), {s['rounds']} round(s), "
        f"{report['date']}",
        "",
    ]
    rows = [
        ("whole-process wall (s)", "wall_s", "{:.1f}", "lower"),
        ("steps/s (step loop, after 2 steps)", "steps_per_second", "{:.2f}", "higher"),
        ("time outside the step loop (s)", "outside_s", "{:.1f}", "lower"),
        ("peak RSS (MiB)", "peak_rss_mb", "{:,.0f}", "lower"),
    ]
    for name, fam in report["families"].items():
        lines += [
            f"**{name}** ({FAMILIES[name].script} against `recipe run`)",
            "",
            "| | recipe-runner | diffusers | ours / diffusers (median; range) | better |",
            "|---|---|---|---|---|",
        ]
        for label, key, fmt, better in rows:
            r = fam["ratios"][key]
            lines.append(
                f"| {label} | {fmt.format(fam['ours'][key])} | {fmt.format(fam['diffusers'][key])} | "
                f"×{r['median']:.2f} (×{r['range'][0]:.2f}–×{r['range'][1]:.2f}) | {better} |"
            )
        own = fam["ours"].get("own_steps_per_second")
        ours, theirs = (", ".join(f"{run[t]['steps_per_second']:.2f}" for run in fam["runs"]) for t in TOOLS)
        lines += [
            "",
            f"per round, steps/s: ours {ours}; diffusers {theirs}"
            + (f"; recipe-runner's own steady rate {own:.2f}" if own else ""),
            "",
        ]
    runs = [run for fam in report["families"].values() for r in fam["runs"] for run in r.values()]
    share = max(run["others_cpu_share"] for run in runs)
    policies = {run["omp_wait_policy"] or "unset" for run in runs}
    lines.append(f"Other processes' CPU use during the runs: at most {share:.0%} of the machine.")
    if share > 0.1:
        lines.append("**Not alone on the machine: these figures are disturbed by other work.**")
    if len(policies) > 1:
        lines.append(
            f"OMP_WAIT_POLICY differed between runs ({', '.join(sorted(policies))}): recipe-runner chose "
            "PASSIVE on a busy machine where the scripts' threads spin; pin it with --env to compare."
        )
    return "\n".join(lines).rstrip() + "\n"


def _git_head(path: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def diffusers_commit(examples: Path, given: str | None) -> str:
    """--diffusers-commit, else DIR/COMMIT, else the git work tree DIR is in, else 'unknown'."""
    if given:
        return given
    if (examples / "COMMIT").is_file():
        return (examples / "COMMIT").read_text().strip()
    return _git_head(examples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-examples", type=Path, required=True, help="folder of the scripts")
    parser.add_argument("--diffusers-commit", help="the scripts' diffusers commit (default: DIR/COMMIT)")
    parser.add_argument("--families", default="sd3,flux", help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool per family, alternating")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for both tools' processes")
    parser.add_argument("--workdir", type=Path, help="keep models, data and logs here (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output folder too")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "vs-diffusers.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "results" / "vs-diffusers.md")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.families or set(args.families) - set(FAMILIES):
        parser.error(f"--families: choose from {', '.join(FAMILIES)}")
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps: more than {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are warm-up)")
    if any("=" not in kv for kv in args.env):
        parser.error("--env: KEY=VALUE")
    scripts = [FAMILIES[f].script for f in args.families]
    missing = [s for s in scripts if not (args.diffusers_examples / s).is_file()]
    if missing:
        parser.error(f"--diffusers-examples {args.diffusers_examples}: no {', '.join(missing)}")

    import diffusers
    import torch

    import recipe_runner

    with tempfile.TemporaryDirectory(prefix="vs-diffusers-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        bench = Bench(root, args)
        families: dict[str, list[dict[str, dict]]] = {name: [] for name in args.families}
        for r in range(args.rounds):
            order = TOOLS if r % 2 == 0 else TOOLS[::-1]
            for name in args.families:
                done = {tool: bench.run(name, tool, r) for tool in order}
                families[name].append(done)
                print(
                    f"round {r + 1}/{args.rounds} {name}: "
                    + "; ".join(
                        f"{t} {d['wall_s']:.1f} s, {d['steps_per_second']:.2f} steps/s"
                        for t, d in done.items()
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    report = {
        "benchmark": "vs_diffusers",
        "date": dt.date.today().isoformat(),
        "diffusers_commit": diffusers_commit(args.diffusers_examples, args.diffusers_commit),
        "diffusers_scripts_sha256": {
            FAMILIES[f].script: hashlib.sha256(
                (args.diffusers_examples / FAMILIES[f].script).read_bytes()
            ).hexdigest()
            for f in args.families
        },
        "diffusers_version": diffusers.__version__,
        "recipe_runner_version": recipe_runner.__version__,
        "recipe_runner_commit": _git_head(REPO),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "settings": {
            "steps": args.steps,
            "rounds": args.rounds,
            "rows": args.rows,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "precision": "fp32",
            "threads": args.threads,
            "env": args.env,
            "warmup_steps": WARMUP_STEPS,
            "sd3_transformer_blocks": SD3_BLOCKS,
        },
        "families": {name: {**summarise(runs), "runs": runs} for name, runs in families.items()},
    }
    table = markdown(report)
    for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.markdown, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(json.dumps(report, indent=2))
    print()
    print(table)
    return report


if __name__ == "__main__":
    main()
