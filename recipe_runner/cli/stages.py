"""Commands that do work: build-dataset, train, run, sample, evaluate, reproduce.

Heavy modules (torch, diffusers, datasets) are imported inside each command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from recipe_runner.cli import process
from recipe_runner.cli.app import JsonOpt, OutputDirOpt, QuietOpt, SetOpt, app, load_checked
from recipe_runner.cli.output import emit_json, err, handles_errors

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")]


BUSY_PERCENT = 25  # of the machine's CPU time, used by other processes as a run starts


def _threads_for(loaded) -> None:
    """CPU threads, set before torch loads (OpenMP reads its environment once, when it starts).

    train.threads goes to OMP_NUM_THREADS. And OpenMP's idle threads spin at barriers, which is fastest
    alone but, beside another job on the same cores, made a run 4.6-5.2x slower (sleeping threads:
    1.4-1.7x; benchmarks/contention.py). So when other processes keep the CPU busy as a run starts,
    its threads sleep instead (OMP_WAIT_POLICY=PASSIVE), unless the user chose a policy."""
    if "torch" in sys.modules:  # in-process callers (tests, notebooks): too late, session.py sets threads
        return
    if loaded.recipe.train.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(loaded.recipe.train.threads)
    if "OMP_WAIT_POLICY" not in os.environ and process.others_cpu_percent() >= BUSY_PERCENT:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _heavy(*, sampling_only: bool = False) -> None:
    from recipe_runner.runfolder.log import quiet_libraries

    if sampling_only:
        process.keep_out(None)
    quiet_libraries()


def _run(file: Path, overrides, output_dir, stages, *, resume=False, quiet=False, json_=False, force=False):
    """--json: JSON lines on stdout (stage and progress events as they happen), the result last."""
    from recipe_runner.run.pipeline import run_recipe
    from recipe_runner.runfolder.events import json_lines

    loaded = load_checked(file, overrides, output_dir=output_dir)
    _threads_for(loaded)
    process.keep_out(loaded)  # optional packages the run will not use, before the libraries import them
    # No _heavy() here: run_recipe quiets the libraries once it knows a stage will run, so that a run
    # with nothing to do never imports torch or diffusers.
    with json_lines(json_) as emit:
        result = run_recipe(
            loaded, stages=stages, output_dir=output_dir, resume=resume, quiet=quiet or json_, force=force
        )
        emit({"event": "result", **result})


@app.command(
    "build-dataset",
    epilog="[bold]Examples[/]\n\n  recipe build-dataset recipes/demo.yaml\n"
    "  recipe build-dataset my.yaml --set dataset.num_proc=4",
)
@handles_errors
def build_dataset(
    file: Annotated[Path, typer.Argument(help="Recipe file.")],
    overrides: SetOpt = None,
    output_dir: OutputDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the inputs are unchanged.")] = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Build the dataset stage alone (image, conditioning_image, prompt) into RUN/dataset."""
    _run(file, overrides, output_dir, ["dataset"], quiet=quiet, json_=json_, force=force)


@app.command(
    epilog="[bold]Examples[/]\n\n  recipe train recipes/demo.yaml\n  recipe train recipes/demo.yaml --resume",
)
@handles_errors
def train(
    file: Annotated[Path, typer.Argument(help="Recipe file.")],
    overrides: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Train the ControlNet (builds the dataset first if it is missing or stale)."""
    _run(file, overrides, output_dir, ["dataset", "train"], resume=resume, quiet=quiet, json_=json_)


@app.command(
    epilog="[bold]Examples[/]\n\n  recipe run recipes/demo.yaml\n"
    "  recipe run recipes/demo.yaml --set train.learning_rate=5e-5 -o runs/demo-lr5e-5\n"
    "  recipe run recipes/demo.yaml --resume",
)
@handles_errors
def run(
    file: Annotated[Path, typer.Argument(help="Recipe file.")],
    overrides: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Run every stage (dataset → train → evaluate), skipping those whose inputs are unchanged."""
    _run(file, overrides, output_dir, None, resume=resume, quiet=quiet, json_=json_)


@app.command(
    epilog='[bold]Examples[/]\n\n  recipe sample runs/demo --condition edges.png --prompt "a red circle"\n'
    '  recipe sample runs/demo --condition edges.png --prompt "a red circle" --num-images 4 --seed 1\n'
    '  recipe sample runs/demo --condition photos/ --extract --prompt "a red circle" --scale 0.8',
)
@handles_errors
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run folder with trained weights.", metavar="RUN_DIR")],
    condition: Annotated[
        Path, typer.Option("--condition", help="Conditioning image, or a folder of them (each sampled).")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="Text prompt.")],
    num_images: Annotated[int, typer.Option("--num-images", min=1, max=64)] = 1,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")] = 20,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", min=0)] = 7.5,
    scale: Annotated[
        float, typer.Option("--scale", min=0, help="ControlNet conditioning scale: how strongly it steers.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    extract: Annotated[
        bool, typer.Option("--extract", help="IMG is a photo: make the condition from it with the recipe's.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Generate images from a trained run; saved under RUN_DIR/samples/."""
    from recipe_runner.run.sample import sample_run

    _heavy(sampling_only=True)
    result = sample_run(
        run_dir,
        condition,
        prompt,
        num_images=num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        conditioning_scale=scale,
        seed=seed,
        extract=extract,
        notes=None if json_ else err,
    )
    if json_:
        emit_json(result)


@app.command(epilog="[bold]Examples[/]\n\n  recipe evaluate runs/demo\n  recipe evaluate runs/demo --json")
@handles_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder with trained weights.", metavar="RUN_DIR")],
    json_: JsonOpt = False,
) -> None:
    """Condition fidelity of a trained run against its base model, on held-out conditions."""
    from recipe_runner.run.pipeline import evaluate_run

    _heavy(sampling_only=True)
    result = evaluate_run(run_dir, quiet=json_)
    if json_:
        emit_json(result)


@app.command(epilog="[bold]Examples[/]\n\n  recipe reproduce runs/demo/run.lock.json -o runs/demo-again")
@handles_errors
def reproduce(
    lock: Annotated[Path, typer.Argument(help="A run.lock.json file.", metavar="LOCK")],
    output_dir: OutputDirOpt = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Re-run exactly what a lock file records into a new folder and compare the weights."""
    from recipe_runner.run.reproduce import reproduce_lock

    _heavy()
    result = reproduce_lock(lock, output_dir=output_dir, quiet=quiet or json_, notes=err)
    if json_:
        emit_json(result)
