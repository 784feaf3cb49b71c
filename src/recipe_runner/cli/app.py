"""Commands that work on recipes without running anything: validate, show, schema, plan, diff.

Nothing imported here may import torch: `recipe validate` must start in well under a second.
The stage commands live in `cli/stages.py` and import the heavy parts lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recipe_runner import __version__
from recipe_runner.cli.output import emit_json, err, handles_errors, out, print_problems
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
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


def load_checked(file: Path, overrides: list[str] | None):
    """Load + validate a recipe and check the files and ids it names; every problem at once."""
    from recipe_runner.recipe.checks import check_inputs
    from recipe_runner.recipe.loader import load_recipe

    loaded = load_recipe(file, overrides or [])
    problems = check_inputs(loaded)
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
    """Parse and validate recipes: every error at once, with file:line:col. Never imports torch."""
    results = []
    for file in files:
        try:
            loaded = load_checked(file, overrides)
            results.append({"file": str(file), "valid": True, "name": loaded.recipe.name, "problems": []})
        except UserError as e:
            problems = e.problems or [Problem(e.message, file=str(file), hint=e.hint)]
            results.append({"file": str(file), "valid": False, "problems": [p.to_dict() for p in problems]})
            if not json_:
                print_problems(problems)
                err.print(f"[red]✗[/] {file}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
            continue
        if not json_ and not quiet:
            out.print(f"[green]✓[/] {file}: valid ({loaded.recipe.name})")
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


# The stage commands register themselves on `app`.
from recipe_runner.cli import review as _review  # noqa: E402,F401
from recipe_runner.cli import stages as _stages  # noqa: E402,F401
