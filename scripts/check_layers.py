#!/usr/bin/env python3
"""Check that recipe_runner's packages import only downwards, and that no modules import each other.

    python scripts/check_layers.py        # exit 0: clean; 1: prints every offending import

The layers, bottom first (docs/architecture.md draws them). A package may import its own modules and
any package of a lower layer, never one above: imports inside functions count too (they still make
the arrow; they are there only to keep torch out of `recipe validate`), and no modules import each
other, at import time or inside functions (imports under TYPE_CHECKING are for annotations: left out).
Reads the source with `ast`; imports nothing of the package.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "recipe_runner"
LAYERS = [
    # the run folder, atomic writes, log, progress events; errors, the offline switch, the allocator
    {"errors", "offline", "malloc", "__init__", "runfolder"},
    {"recipe"},  # the recipe's model and loading (no torch)
    {"conditions"},  # conditioning images from photos
    {"data"},  # the dataset stage
    {"models"},  # offline model builders: tiny bases, full-size architectures
    {"families"},  # model families behind one interface, and loading a base
    {"evaluate"},  # condition fidelity of a pipeline, the evaluate stage
    {"training"},  # the training stage
    {"export"},  # other tools' formats of a trained run (single-file, Control-LoRA, adapter), the Hub
    {"run"},  # orchestration (stages, pipeline) and review tools (plan, diff, estimates)
    {"cli"},  # the command line
    {"__main__"},
]


def layer_of(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for each of the package's modules `module` imports."""
    found: list[tuple[str, int]] = []
    is_package = path.name == "__init__.py"

    def target(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name if name and name != module else None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            else:
                visit(child)
                continue
            for name in names:
                if name.startswith(PACKAGE) and (hit := target(name)) is not None:
                    found.append((hit, child.lineno))

    visit(ast.parse(path.read_text(), str(path)))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def problems(root: Path) -> list[str]:
    known = modules(root)
    out: list[str] = []
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in known.items():
        here = package_of(module)
        for target, line in _imports(module, path, known):
            there = package_of(target)
            graph[module].add(target)
            if there == here:
                continue
            if here not in {n for layer in LAYERS for n in layer}:
                out.append(f"{path}:{line}: package {here!r} is in no layer of scripts/check_layers.py")
            elif layer_of(there) >= layer_of(here):
                out.append(
                    f"{path.relative_to(root)}:{line}: {module} imports {target}: {here} may not import "
                    f"{there} (a layer {'above' if layer_of(there) > layer_of(here) else 'beside'} it)"
                )
    for cycle in _cycles(graph):
        out.append("import cycle: " + " -> ".join(cycle))
    return out


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    found = problems(root)
    for line in found:
        print(line)
    if not found:
        print(f"{PACKAGE}: {len(modules(root))} modules, imports point down {len(LAYERS)} layers, no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
