"""What evaluation leaves behind: the image grid, the model card section, TensorBoard scalars, a table."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from recipe_runner.evaluate.metrics import HIGHER_IS_BETTER
from recipe_runner.runfolder.atomic import write_text

GRID_COLUMNS = ("condition", "baseline", "ControlNet")
CARD_HEADING = "## Evaluation"


def header_height(cell: int) -> int:
    """Height of the grid's label row for images `cell` pixels high."""
    return max(16, cell // 8)


def make_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = GRID_COLUMNS) -> Image.Image:
    """One row per held-out example (condition | baseline | ControlNet), under a row of column labels."""
    w, h = rows[0][0].size
    top = header_height(h)
    grid = Image.new("RGB", (w * len(labels), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=max(8, top * 2 // 3))
    for c, label in enumerate(labels):
        draw.text((c * w + w // 2, top // 2), label, fill="black", font=font, anchor="mm")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h)), (c * w, top + r * h))
    return grid


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _arrow(name: str) -> str:
    better = HIGHER_IS_BETTER.get(name)
    return "" if better is None else (" ↑" if better else " ↓")


def card_section(results: dict[str, Any], grid_link: str) -> str:
    """The model card's evaluation section: mean metrics (base vs ControlNet) and the grid."""
    mean, s = results["mean"], results["settings"]
    lines = [
        CARD_HEADING,
        "",
        f"Condition fidelity on {s['num_rows']} held-out rows: the `{s['condition']}` condition is "
        "re-extracted from each generated image and compared with the input condition (↑: higher is better).",
        f"Settings: {s['num_inference_steps']} steps, guidance scale {s['guidance_scale']}, "
        f"edge tolerance {s['tolerance']} px, seed {s['seed']}.",
        "",
        "| metric | base model | ControlNet |",
        "|---|---:|---:|",
    ]
    for name in mean["ours"]:
        base = mean.get("baseline", {}).get(name)
        lines.append(f"| {name}{_arrow(name)} | {_fmt(base)} | {_fmt(mean['ours'][name])} |")
    lines += ["", f"![condition | baseline | ControlNet]({grid_link})", ""]
    return "\n".join(lines)


def update_model_card(card: Path, section: str) -> None:
    """Replace the card's evaluation section (up to the next `## ` heading), or append one."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    pattern = re.compile(rf"^{re.escape(CARD_HEADING)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        new = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    else:
        new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section.rstrip("\n") + "\n"
    write_text(card, new)


def log_scalars(log_dir: Path, mean: dict[str, dict[str, float | None]], step: int) -> None:
    """`evaluate/<metric>` (ControlNet) and `evaluate_baseline/<metric>` at `step` in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for who, prefix in (("ours", "evaluate"), ("baseline", "evaluate_baseline")):
            for name, value in mean.get(who, {}).items():
                if value is not None and not math.isnan(value):
                    writer.add_scalar(f"{prefix}/{name}", value, step)
    finally:
        writer.close()


def print_table(console: Any, mean: dict[str, dict[str, float | None]]) -> None:
    """metric | base | ControlNet, the better value of each row in bold."""
    from rich.table import Table

    table = Table(title="condition fidelity (held-out rows)", header_style="bold")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("ControlNet", justify="right")
    for name, ours in mean["ours"].items():
        base = mean.get("baseline", {}).get(name)
        cells = [_fmt(base), _fmt(ours)]
        if base is not None and ours is not None and name in HIGHER_IS_BETTER and base != ours:
            best = int((ours > base) == HIGHER_IS_BETTER[name])
            cells[best] = f"[bold green]{cells[best]}[/]"
        table.add_row(name + _arrow(name), *cells)
    console.print(table)
