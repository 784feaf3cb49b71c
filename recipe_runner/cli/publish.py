"""Commands that publish a finished run: export (other tools' formats), push (to the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from recipe_runner.cli.app import JsonOpt, app
from recipe_runner.cli.output import emit_json, err, handles_errors

RunDirArg = Annotated[Path, typer.Argument(help="A run folder with trained weights.", metavar="RUN_DIR")]


@app.command(
    epilog="[bold]Examples[/]\n\n  recipe export runs/demo --format single-file\n"
    "  recipe export runs/demo --format control-lora --rank 128\n"
    "  recipe export runs/demo --format diffusers --dtype bf16 --format single-file",
)
@handles_errors
def export(
    run_dir: RunDirArg,
    formats: Annotated[
        list[str],
        typer.Option(
            "--format",
            "-f",
            help="diffusers (fp16/bf16 folder), single-file (original layout: AUTOMATIC1111, ComfyUI), "
            "control-lora (Stability's format), adapter (a train.lora run's PEFT adapter). Repeatable.",
        ),
    ],
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp16, bf16 or fp32, for diffusers and single-file.")
    ] = "fp16",
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            max=4096,
            help="control-lora: the rank of a truncated SVD of (ControlNet - base UNet); "
            "default for a train.lora run: its adapter, exactly.",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Write the trained ControlNet in other tools' formats into RUN_DIR/export/."""
    from recipe_runner.run.publish import export_folder

    say = (lambda _m: None) if json_ else (lambda m: err.print(escape(m)))
    results = export_folder(run_dir, formats, dtype=dtype, rank=rank, say=say)
    for r in results:
        if r.get("source") == "svd":
            worst = r.get("worst_layer") or {}
            say(
                f"control-lora at rank {r['rank']}: relative error {r['relative_error']:.4f} "
                "of (ControlNet - base)"
                + (f"; worst layer {worst['name']} {worst['relative_error']:.4f}" if worst else "")
            )
    if json_:
        emit_json(results)


@app.command(
    epilog="[bold]Examples[/]\n\n  recipe push runs/demo\n  recipe push runs/demo --repo-id me/cn --public"
)
@handles_errors
def push(
    run_dir: RunDirArg,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="owner/name; default: the recipe's output.hub_model_id.")
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="Create the repository public (default: output.hub_private).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Upload a finished run (weights, model card, sample grids, exports) to the Hugging Face Hub."""
    from recipe_runner.run.publish import push_run

    say = (lambda _m: None) if json_ else (lambda m: err.print(escape(m)))
    result = push_run(run_dir, repo_id=repo_id, private=False if public else None, say=say)
    if json_:
        emit_json(result)
