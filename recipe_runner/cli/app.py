"""Commands that work on recipes without running anything: validate, show, schema, plan, diff.

Nothing imported here may import torch: `recipe validate` must start in well under a second.
The stage commands live in `cli/stages.py` and import the heavy parts lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperOption

from recipe_runner import __version__
from recipe_runner.cli.output import emit_json, err, format_problem, handles_errors, out, print_problems
from recipe_runner.errors import Problem, RecipeError, UserError

EXAMPLES = """
[bold]Examples[/]

  recipe validate recipes/*.yaml
  recipe show recipes/fill50k-canny.yaml --set train.learning_rate=5e-5
  recipe plan recipes/demo.yaml
  recipe run recipes/demo.yaml
  recipe diff recipes/fill50k-canny.yaml recipes/sdxl-canny.yaml --format markdown
  recipe sample runs/demo --condition edges.png --prompt "a red circle on a blue background"
  recipe reproduce runs/demo/run.lock.json
"""

app = typer.Typer(
    name="recipe",
    help="Train ControlNets for Stable Diffusion from one declarative YAML recipe.",
    epilog=EXAMPLES,
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=True,  # recipe --install-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
)

# typer prints a flag's type as `<bool>` in --help, which reads as if the flag took a value.
_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)  # type: ignore[method-assign]

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field after `extends`: dotted.path=YAML value (repeatable), "
        "e.g. train.learning_rate=5e-5.",
        metavar="PATH=VALUE",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
# A string, not a Path: typer turns '' into Path('.'), and an empty --output-dir is a mistake, not `.`.
OutputDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output-dir", "-o", metavar="DIR", help="The run folder (default: output.dir, else runs/NAME)."
    ),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"recipe-runner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Train ControlNets for Stable Diffusion from one declarative YAML recipe."""


def load_checked(
    file: Path,
    overrides: list[str] | None,
    warnings: list[Problem] | None = None,
    output_dir: str | None = None,
):
    """Load + validate a recipe and check the files and ids it names; every problem at once.

    Warnings (a hub id that moved, ...) never fail: they are printed on stderr, or appended to
    `warnings` when it is given (for `recipe validate --json`)."""
    from recipe_runner.data.columns import check_columns
    from recipe_runner.recipe.checks import check_inputs
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.recipe.notices import recipe_warnings
    from recipe_runner.recipe.preset import add_preset_hint
    from recipe_runner.run.safety import check_run_folder

    try:
        loaded = load_recipe(file, overrides or [])
    except RecipeError as e:
        add_preset_hint(e.problems)
        raise
    found = recipe_warnings(loaded.data, loaded.origins, str(file), loaded.base_dir)
    if warnings is None:
        for w in found:
            err.print(format_problem(w, "warning"))
    else:
        warnings.extend(found)
    problems = check_inputs(loaded) + check_columns(loaded)
    problems += check_run_folder(loaded, output_dir)  # the run touches no input
    if problems:
        raise RecipeError(problems)
    return loaded


@app.command(epilog="[bold]Examples[/]\n\n  recipe validate recipes/*.yaml\n  recipe validate my.yaml --json")
@handles_errors
def validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe files.", metavar="FILE...")],
    overrides: SetOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Parse and validate recipes: every error at once, with file:line:col. Never imports torch.

    Presets (files in a folder named base/, or with a `# recipe-runner: preset` header comment) are
    checked as partial recipes: known keys and valid values, required fields may be missing.
    Warnings (e.g. a base model id that moved on the hub) are printed but do not fail."""
    from recipe_runner.recipe.notices import recipe_warnings
    from recipe_runner.recipe.preset import is_preset, load_preset

    results = []
    for file in files:
        preset = is_preset(file)
        warnings: list[Problem] = []
        problems: list[Problem] = []
        entry: dict = {"file": str(file), "preset": preset}
        try:
            if preset:
                loaded_preset = load_preset(file, overrides or [])
                warnings = recipe_warnings(
                    loaded_preset.data, loaded_preset.origins, str(file), loaded_preset.base_dir
                )
                entry.update(valid=True, name=None, problems=[])
            else:
                loaded = load_checked(file, overrides, warnings=warnings)
                entry.update(valid=True, name=loaded.recipe.name, problems=[])
        except UserError as e:
            problems = e.problems or [Problem(e.message, file=str(file), hint=e.hint)]
            entry.update(valid=False, problems=[p.to_dict() for p in problems])
        entry["warnings"] = [w.to_dict() for w in warnings]
        results.append(entry)
        if json_:
            continue
        for w in warnings:  # printed even with --quiet: like errors, they name a line to change
            err.print(format_problem(w, "warning"))
        if not entry["valid"]:
            print_problems(problems)
            err.print(
                f"[red]✗[/] {escape(str(file))}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
            )
        elif not quiet:
            what = "valid preset" if preset else f"valid ({entry['name']})"
            out.print(f"[green]✓[/] {escape(str(file))}: {escape(what)}")
    if json_:
        emit_json({"valid": all(r["valid"] for r in results), "files": results})
    if not all(r["valid"] for r in results):
        raise typer.Exit(2)


@app.command(
    epilog="[bold]Examples[/]\n\n  recipe show recipes/demo.yaml\n  recipe show my.yaml --set seed=3"
)
@handles_errors
def show(
    file: Annotated[Path, typer.Argument(help="Recipe file.")],
    overrides: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Print the fully resolved recipe (extends + defaults + --set applied) as YAML."""
    from recipe_runner.recipe.show import resolved_yaml

    loaded = load_checked(file, overrides)
    if json_:
        emit_json(loaded.recipe.resolved_dict())
        return
    typer.echo(resolved_yaml(loaded.recipe, header=f"resolved from {file}"), nl=False)


@app.command(epilog="[bold]Examples[/]\n\n  recipe schema > schemas/recipe.schema.json")
@handles_errors
def schema() -> None:
    """Print the JSON Schema of the recipe format (the checked-in schemas/recipe.schema.json equals it)."""
    from recipe_runner.recipe.schema import schema_text

    typer.echo(schema_text(), nl=False)
