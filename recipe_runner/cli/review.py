"""`recipe diff` and `recipe plan`: review a recipe change, or a run, before any work is done.

Neither imports torch, diffusers or datasets; the work is in `run/diff.py` and `run/plan.py`.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from recipe_runner.cli.app import JsonOpt, OutputDirOpt, SetOpt, app
from recipe_runner.cli.output import emit_json, err, handles_errors, out
from recipe_runner.errors import RecipeError, UserError

DIFF_EPILOG = """[bold]Examples[/]

  recipe diff recipes/fill50k-canny.yaml recipes/sdxl-canny.yaml
  recipe diff old.yaml new.yaml --format markdown > comment.md      [dim]# a pull-request comment[/]
  recipe diff my.yaml my.yaml --set-b train.learning_rate=2e-5      [dim]# what would this override mean?[/]
  recipe diff --git HEAD recipes/demo.yaml                          [dim]# committed vs working copy[/]
  recipe diff --git origin/main recipes/demo.yaml --exit-code       [dim]# CI: exit 1 if it changed[/]
  git difftool -y -x 'recipe diff' HEAD~1 -- recipes/demo.yaml

Compares the resolved recipes (extends, defaults and --set applied), so reordered keys, comments and
defaults written out make no difference. Exit code 0 whether or not they differ (1 with --exit-code,
like git diff), 2 if a recipe is invalid. With --git, FILE at REV is written next to FILE for the
comparison, so relative `extends` resolve; the files it extends are read from the working copy.
`git difftool` hands over a copy in a temporary folder, where relative `extends` do not resolve:
prefer --git for recipes that extend others.
"""

PLAN_EPILOG = """[bold]Examples[/]

  recipe plan recipes/demo.yaml
  recipe plan recipes/demo.yaml --set dataset.resolution=768 --output-dir runs/demo-768
  recipe plan recipes/fill50k-canny.yaml --json | jq .memory.total_gb
  recipe plan recipes/fill50k-canny.yaml --trace

Nothing is loaded or run: row counts come from file metadata, memory and time from parameter counts
and a throughput table (estimates, typically within ±30%). --trace runs the training step on fake
tensors (torch, the models' configs only, seconds; no GPU needed) for the exact peak memory.
"""


class DiffFormat(str, Enum):
    text = "text"
    markdown = "markdown"
    json = "json"


@contextlib.contextmanager
def file_at_revision(file: Path, rev: str) -> Iterator[Path | None]:
    """FILE as committed at REV, in a hidden temporary file beside FILE (so relative `extends` resolve);
    None when REV is a commit without FILE (a recipe added since)."""
    folder = file.resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, timeout=30, check=False)

    try:
        done = git("show", f"{rev}:./{file.name}")
        # git's wording for a path absent at REV varies by version: ask whether REV itself is a commit.
        absent = (
            done.returncode != 0
            and git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode == 0
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(
            f"could not run git: {e}", hint="install git, or compare two files: recipe diff A B"
        ) from None
    if absent:
        yield None
        return
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"cannot read {file} at {rev}: {why[-1] if why else 'git show failed'}")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rev)
    fd, name = tempfile.mkstemp(prefix=f".{file.stem}@{safe}.", suffix=file.suffix or ".yaml", dir=folder)
    tmp = Path(name)
    try:
        with open(fd, "wb") as fh:
            fh.write(done.stdout)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _load(file: Path, overrides: list[str], shown_as: str | None = None) -> Any:
    """Load and validate (no input checks: a diff of an old revision must not fail on moved data)."""
    from recipe_runner.recipe.loader import load_recipe

    try:
        return load_recipe(file, overrides)
    except RecipeError as e:
        if shown_as is not None:  # name the revision, not the temporary file, in every message
            for p in e.problems:
                if p.file and Path(p.file).resolve() == file.resolve():
                    p.file = shown_as
        raise


@app.command(epilog=DIFF_EPILOG)
@handles_errors
def diff(
    files: Annotated[
        list[Path],
        typer.Argument(help="The recipes to compare, old then new; with --git, one FILE.", metavar="A B"),
    ],
    git_rev: Annotated[
        str | None,
        typer.Option(
            "--git", metavar="REV", help="Compare FILE as committed at REV (HEAD, main, a1b2c3) with FILE."
        ),
    ] = None,
    fmt: Annotated[
        DiffFormat, typer.Option("--format", "-f", help="text (terminal), markdown (PR) or json.")
    ] = (DiffFormat.text),
    overrides: SetOpt = None,
    set_a: Annotated[
        list[str] | None, typer.Option("--set-a", metavar="PATH=VALUE", help="Like --set, for A only.")
    ] = None,
    set_b: Annotated[
        list[str] | None, typer.Option("--set-b", metavar="PATH=VALUE", help="Like --set, for B only.")
    ] = None,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 1 when the recipes differ.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Semantic difference of two resolved recipes, and what it means (rebuild, retrain, batch, lr, ...).

    --set applies to both recipes, --set-a and --set-b to one of them.
    """
    from recipe_runner.run.diff import diff_recipes, new_recipe

    if git_rev is not None and len(files) != 1:
        raise UserError("--git REV takes one FILE", hint="recipe diff --git HEAD recipes/demo.yaml")
    if git_rev is None and len(files) != 2:
        raise UserError("expected two recipe files: recipe diff A B", hint="or one FILE with --git REV")
    both = list(overrides or [])
    with contextlib.ExitStack() as stack:
        if git_rev is not None:
            b_path = files[0]
            a_label, b_label = f"{b_path}@{git_rev}", str(b_path)
            a_path = stack.enter_context(file_at_revision(b_path, git_rev))
            if a_path is None:  # added since REV: a review still wants to see what it trains
                a_label += " (absent: new recipe)"
            a = None if a_path is None else _load(a_path, both + (set_a or []), shown_as=a_label)
        else:
            a_path, b_path = files
            a_label, b_label = str(a_path), str(b_path)
            a = _load(a_path, both + (set_a or []))
        b = _load(b_path, both + (set_b or []))
        same_text = (
            a_path is not None and a_path.read_bytes() == b_path.read_bytes() and not set_a and not set_b
        )
    # The same file on both sides (`recipe diff my.yaml my.yaml --set-b ...`) needs telling apart.
    a_label += " (with --set-a)" if set_a else ""
    b_label += " (with --set-b)" if set_b else ""
    if a is None:
        result = new_recipe(b.recipe, b.base_dir)
    else:
        result = diff_recipes(a.recipe, b.recipe, (a.base_dir, b.base_dir))
    if json_ or fmt is DiffFormat.json:
        emit_json({"a": a_label, "b": b_label, "new_recipe": a is None, **result.to_dict()})
    elif fmt is DiffFormat.markdown:
        typer.echo(diff_markdown(result, a_label, b_label), nl=False)
    else:
        _print_diff(result, a_label, b_label, same_text)
    if exit_code and not result.identical:
        raise typer.Exit(1)


def value_text(value: Any, limit: int = 60) -> str:
    """A field value as a reviewer reads it: YAML spelling (null, true), short floats, long values cut."""
    import json

    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value) if value != "" else '""'
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cells(change: Any) -> tuple[list[str], list[str]]:
    """Old and new cell lines; a list of strings shows only the items removed and added."""
    from recipe_runner.run.diff import list_delta

    delta = list_delta(change.old, change.new)
    if delta is not None and all(isinstance(x, str) for x in change.old + change.new):
        removed, added = delta
        if not removed and not added:
            return [f"{len(change.old)} items"], ["same items, reordered"]
        return [f"− {value_text(x)}" for x in removed], [f"+ {value_text(x)}" for x in added]
    old = [] if change.kind == "added" else [value_text(change.old)]
    new = [] if change.kind == "removed" else [value_text(change.new)]
    return old, new


def _print_diff(result: Any, a: str, b: str, same_text: bool) -> None:
    if result.identical:
        why = (
            ""
            if same_text
            else " (the files differ only in formatting, comments, key order or explicit defaults)"
        )
        out.print(f"[green]no semantic difference[/] between {escape(a)} and {escape(b)}{why}")
        return
    out.print(f"[bold]recipe diff[/] {escape(a)} → {escape(b)}: {len(result.changes)} field(s) differ")
    style = {"changed": "yellow", "added": "green", "removed": "red"}
    for section, changes in result.by_section().items():
        table = Table(title=f"[bold]{section}[/]", title_justify="left", header_style="bold", expand=False)
        table.add_column("field", style="cyan")
        table.add_column(a, overflow="fold")
        table.add_column(b, overflow="fold")
        for c in changes:
            old, new = cells(c)
            tag = {"added": " (added)", "removed": " (removed)"}.get(c.kind, "")
            table.add_row(
                escape(c.field) + tag,
                f"[red]{escape(chr(10).join(old))}[/]",
                f"[{style[c.kind]}]{escape(chr(10).join(new))}[/]",
            )
        out.print(table)
    out.print("[bold]What this means[/]")
    colour = {"rebuild": "red", "retrain": "yellow", "info": "default"}
    for imp in result.implications:
        out.print(f"  [{colour[imp.level]}]•[/] {escape(imp.text)}")


def _md(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if "`" not in text and text else text


def diff_markdown(result: Any, a: str, b: str) -> str:
    """A table per section, for a pull-request comment."""
    lines = [f"### Recipe diff: `{a}` → `{b}`", ""]
    if result.identical:
        return "\n".join([*lines, "No semantic difference.", ""])
    lines += [f"**What this means:** {'; '.join(i.text for i in result.implications)}.", ""]
    for section, changes in result.by_section().items():
        lines += [f"#### {section}", "", f"| field | `{a}` | `{b}` |", "|---|---|---|"]
        for c in changes:
            old, new = cells(c)
            tag = f" ({c.kind})" if c.kind != "changed" else ""
            lines.append(
                f"| `{c.field}`{tag} | {'<br>'.join(map(_md, old))} | {'<br>'.join(map(_md, new))} |"
            )
        lines.append("")
    return "\n".join(lines)


@app.command(epilog=PLAN_EPILOG)
@handles_errors
def plan(
    file: Annotated[Path, typer.Argument(help="Recipe file.")],
    overrides: SetOpt = None,
    output_dir: OutputDirOpt = None,
    json_: JsonOpt = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="Also trace the training step's peak accelerator memory on fake tensors: exact where the "
            "estimate is a table; imports torch, reads only the models' configs, takes seconds, no GPU.",
        ),
    ] = False,
) -> None:
    """What `recipe run` would do: stages that would run or are cached (and why), dataset size, steps,
    and memory and time estimates. Nothing is loaded or run."""
    from recipe_runner.cli.app import load_checked
    from recipe_runner.run.plan import make_plan

    loaded = load_checked(file, overrides, output_dir=output_dir)
    if trace and not json_:  # SD 1.5 takes ~10 s, SDXL ~25 s: say what is happening
        with err.status("tracing the training step on fake tensors (no GPU needed)…"):
            result = make_plan(loaded, output_dir, trace=True)
    else:
        result = make_plan(loaded, output_dir, trace=trace)
    if json_:
        emit_json(result.to_dict())
        return
    _print_plan(result)


def _print_plan(p: Any) -> None:
    from recipe_runner.run.estimates import format_duration

    out.print(f"[bold]plan[/] {escape(p.name)} → {escape(p.run_dir)}")
    stages = Table(header_style="bold", expand=False)
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("why", overflow="fold")  # an export's file name whole, not cut with "…"
    for s in p.stages:
        status = "[yellow]would run[/]" if s.runs else "[green]cached[/]"
        stages.add_row(s.name, status, escape(s.reason))
    for s in p.publish:  # after the stages: output.export and output.push_to_hub
        status = "[yellow]would run[/]" if s.runs else "[green]cached[/]"
        target = s.target.removeprefix(p.run_dir.rstrip("/") + "/")  # export/NAME: the run folder is above
        stages.add_row(s.name, status, f"{escape(s.reason)} → {escape(target)}")
    out.print(stages)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    r = p.rows
    rows = f"{'≈ ' if r.approximate else ''}{r.rows} ({r.how})" if r.rows is not None else r.how
    train = f"{p.train_rows} for training" if p.train_rows is not None else "training rows unknown"
    facts.add_row("dataset rows", f"{escape(rows)}; {train}")
    if p.buckets:
        built = any(n is not None for n in p.buckets.values())
        shown = " ".join(f"{size}: {n}" if built else size for size, n in p.buckets.items())
        facts.add_row(
            "aspect buckets", f"{len(p.buckets)}: {shown}" + ("" if built else " (rows known once built)")
        )
    if p.lora_trainable is not None:
        share = p.lora_trainable / p.memory.sizes.controlnet
        facts.add_row(
            "trained weights",
            f"≈ {p.lora_trainable / 1e6:.1f}M of the ControlNet's {p.memory.sizes.controlnet / 1e6:.0f}M "
            f"({share:.0%}: train.lora's matrices, and the ControlNet's own additions in full)",
        )
    facts.add_row("effective batch", str(p.effective_batch))
    epochs = f" (≈ {p.epochs:.1f} epochs)" if p.epochs is not None else ""
    if p.precomputes and p.epochs is not None and p.epochs < 1:
        epochs += "\n[dim]the precompute encodes only the rows these steps draw[/]"
    facts.add_row("steps", f"{p.steps if p.steps is not None else 'unknown'}{epochs}")
    m = p.memory
    facts.add_row(
        "memory (estimate)",
        f"≈ {m.total_gb:.1f} GB per process: frozen {m.denoiser} {m.frozen_unet_gb:.1f} + ControlNet weights/"
        f"optimizer {m.controlnet_training_gb:.1f} + gradients {m.gradients_gb:.1f} + VAE/text encoders "
        f"{m.vae_text_encoders_gb:.1f} + activations {m.activations_gb:.1f} + overhead {m.overhead_gb:.1f}"
        f"\n[dim]{escape(m.sizes.source)}{'' if p.traced else '; --trace for the exact peak'}[/]",
    )
    if p.traced:
        tr = p.traced
        ddp = f" + DDP buckets {tr['ddp_buckets_gb']:.1f}" if tr["ddp_buckets_gb"] else ""
        facts.add_row(
            "memory (traced)",
            f"{tr['total_gb']:.1f} GB per process: step peak {tr['peak_gb']:.2f} (in {tr['peak_phase']}: "
            f"frozen weights {tr['frozen_weights_gb']:.2f} + ControlNet {tr['controlnet_weights_gb']:.2f} + "
            f"optimizer state {tr['optimizer_state_gb']:.2f} + "
            + (f"EMA {tr['ema_gb']:.2f} + " if tr.get("ema_gb") else "")
            + "gradients/activations "
            f"{tr['gradients_activations_temporaries_gb']:.2f}){ddp} + overhead {tr['overhead_gb']:.1f}"
            f"\n[dim]traced on fake tensors: {escape(tr['models'])}"
            + (f"; the square and the most elongated bucket, peak at {tr['size']}" if p.buckets else "")
            + "[/]",
        )
    t = p.time
    when = f"≈ {format_duration(t.seconds)}" if t.seconds is not None else "unknown"
    facts.add_row(
        "time (estimate)", f"{when} at ≈ {t.steps_per_s:.3g} steps/s\n[dim]{escape(t.assumption)}[/]"
    )
    out.print(facts)
    for w in p.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    if p.memory_savers:
        lighter = f" (≈ {p.memory_with_savers_gb:.1f} GB with all of them)" if p.memory_with_savers_gb else ""
        out.print(f"to use less memory{lighter}:")
        for s in p.memory_savers:
            out.print(f"  • {escape(s)}")
